"""Failing upstreams, end to end on real sockets: the client gets a 502/504 (or an aborted
stream once the head went out), the upstream connection is closed and never pooled, and
afterwards nothing is left in use or open (pool counters, the upstream's view, and the fds
of this process, where the proxy runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h11
import pytest
import trio

from tests.support.faulty_upstream import (
    BAD_HEADS,
    FaultyUpstream,
    open_fd_count,
    refused_port,
    wait_until,
)
from tests.support.helpers import HOST, H11Client, RunningProxy, make_config, start_proxy

TIMEOUTS = {"response_header_timeout": 0.3, "read_timeout": 0.3}


@dataclass
class Outcome:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    complete: bool  # the body ended properly (EndOfMessage), not by a cut connection


async def fetch(port: int, target: str, *, read_limit: int | None = None) -> Outcome:
    """One GET on a fresh client connection; reads until the response ends or is cut."""
    conn = h11.Connection(h11.CLIENT)
    async with await trio.open_tcp_stream(HOST, port) as stream:
        await stream.send_all(
            conn.send(h11.Request(method="GET", target=target, headers=[("host", "test.local")]))
            + conn.send(h11.EndOfMessage())
        )
        response: Any = None
        body = b""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                break
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
                if read_limit is not None and len(body) >= read_limit:
                    break
            elif isinstance(event, h11.EndOfMessage):
                return Outcome(response.status_code, dict(response.headers), body, True)
            else:
                break
    assert response is not None, "no response head at all"
    return Outcome(response.status_code, dict(response.headers), body, False)


async def assert_settled(proxy: RunningProxy, upstream: FaultyUpstream, fds_before: int) -> None:
    """Nothing in use, nothing open beyond what idles in the pool (two fds per connection)."""
    pool = proxy.pool()

    def settled() -> bool:
        stats = pool.statistics()
        return (
            stats.in_use == 0
            and upstream.connections_open == stats.idle
            and open_fd_count() == fds_before + 2 * stats.idle
        )

    await wait_until(
        settled,
        what=f"{pool.statistics()}, upstream open {upstream.connections_open}, fds {open_fd_count()} vs {fds_before}",
    )


@pytest.fixture
async def faulty(nursery: trio.Nursery) -> tuple[FaultyUpstream, int]:
    upstream = FaultyUpstream(drip_interval=0.05)
    port = await nursery.start(upstream.serve)
    return upstream, port


# mode -> (status, Proxy-Status error)
BEFORE_HEAD = {
    "reset-before-head": (502, b"http_response_incomplete"),
    "close-before-head": (502, b"http_response_incomplete"),
    "reset-mid-head": (502, b"http_response_incomplete"),
    "garbage": (502, b"http_protocol_error"),
    "hang": (504, b"http_response_timeout"),
    "drip": (504, b"http_response_timeout"),
    **{f"bad-response?kind={kind}": (502, b"http_protocol_error") for kind in BAD_HEADS},
}


@pytest.mark.parametrize("mode", list(BEFORE_HEAD))
async def test_fault_before_the_head_is_an_error_answer(nursery, faulty, mode):
    upstream, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        outcome = await fetch(proxy.port, f"/{mode}")
        status, error = BEFORE_HEAD[mode]
        assert (outcome.status, outcome.complete) == (status, True)
        assert outcome.headers[b"proxy-status"].startswith(b"pooled-proxy; error=" + error)
        await assert_settled(proxy, upstream, fds_before)
    stats = proxy.pool().statistics()
    assert stats.idle == 0 and stats.closed.get("error", 0) >= 1


async def test_refused_is_502_connection_refused(nursery):
    proxy = await start_proxy(nursery, make_config(await refused_port()))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        outcome = await fetch(proxy.port, "/")
        await wait_until(lambda: open_fd_count() == fds_before)
    assert outcome.status == 502
    assert b"error=connection_refused" in outcome.headers[b"proxy-status"]
    assert proxy.pool().statistics().in_use == 0


@pytest.mark.parametrize("mode", ["reset-mid-body", "half-chunked", "hang-mid-body"])
async def test_fault_after_the_head_aborts_the_stream(nursery, faulty, mode):
    upstream, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        outcome = await fetch(proxy.port, f"/{mode}")
        # The head (200) was already relayed: the only honest signal left is a cut stream.
        assert outcome.status == 200 and not outcome.complete
        await assert_settled(proxy, upstream, fds_before)
    assert proxy.pool().statistics().idle == 0


async def test_client_leaving_an_endless_body_closes_the_upstream(nursery, faulty):
    upstream, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        outcome = await fetch(proxy.port, "/endless", read_limit=200_000)
        assert outcome.status == 200 and len(outcome.body) >= 200_000
        await assert_settled(proxy, upstream, fds_before)
    assert proxy.pool().statistics().idle == 0


async def test_client_that_stops_reading_is_cut_off_by_write_timeout(nursery, faulty):
    upstream, port = faulty
    config = make_config(port, **TIMEOUTS, server={"write_timeout": 0.3})
    proxy = await start_proxy(nursery, config)
    fds_before = open_fd_count()
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(HOST, proxy.port) as stream:
            await stream.send_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n")
            # Never read: socket buffers fill, the proxy's write stalls, write_timeout fires
            # and the upstream connection goes with the client's.
            await wait_until(lambda: upstream.faults["endless"] == 1)
            await wait_until(lambda: upstream.connections_open == 0, timeout=3)
            assert proxy.pool().statistics().in_use == 0
        await assert_settled(proxy, upstream, fds_before)


async def test_bytes_after_a_response_never_reach_the_next_request(nursery, faulty):
    """An upstream that glues a second response behind the first must not get it delivered
    to whoever reuses the connection (response queue poisoning)."""
    upstream, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        first = await fetch(proxy.port, "/extra")
        assert (first.status, first.body, first.complete) == (200, b"ok", True)
        second = await fetch(proxy.port, "/ok")
        assert (second.status, second.body) == (200, b"ok")
        assert b"x-smuggled" not in second.headers
        await assert_settled(proxy, upstream, fds_before)
    assert upstream.connections_opened == 2


async def test_good_requests_after_faults_still_pool(nursery, faulty):
    upstream, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        for mode in ("garbage", "ok", "reset-mid-body", "ok", "hang", "ok"):
            await fetch(proxy.port, f"/{mode}")
        await assert_settled(proxy, upstream, fds_before)
    stats = proxy.pool().statistics()
    assert stats.idle == 1 and stats.reused == 2


async def test_failed_head_request_is_a_bodyless_502_and_keeps_the_connection(nursery, faulty):
    """Found by the fuzz: the error answer's body was written on a HEAD response, which h11
    refuses, and the exception took the client's connection task down."""
    _, port = faulty
    proxy = await start_proxy(nursery, make_config(port, **TIMEOUTS))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(method="HEAD", target="/garbage", headers=[("host", "a")]),
                h11.EndOfMessage(),
            )
            reply = await client.read_reply()
            assert reply.status == 502 and reply.body == b""
            assert b"error=http_protocol_error" in reply.headers[b"proxy-status"]
            assert (await client.request("GET", "/ok")).body == b"ok"  # same connection
