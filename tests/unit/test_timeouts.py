"""Slow or stuck clients and upstreams, on trio's MockClock over in-memory streams: each
timeout fires at exactly its configured time, answers what the contract says, and lets go of
the upstream connection at that moment, not later."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h2.events
import h2.settings
import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes
from hyperframe.frame import HeadersFrame

from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.proxy import Proxy
from pooled_proxy.upstream.pool import WATCH_AFTER
from tests.support.faulty_upstream import (
    RECEIVE_SIZE,
    FaultyUpstream,
    memory_client,
    read_until_close,
)
from tests.support.h2client import H2Client
from tests.support.helpers import make_config

SERVER = {
    "header_timeout": 10.0,
    "keepalive_timeout": 75.0,
    "body_timeout": 60.0,
    "write_timeout": 30.0,
}
UPSTREAM = {"response_header_timeout": 20.0, "read_timeout": 40.0}


@pytest.fixture
def upstream() -> FaultyUpstream:
    return FaultyUpstream()


@pytest.fixture
def proxy(nursery: trio.Nursery, upstream: FaultyUpstream) -> Proxy:
    # Port 1 is never dialled: the connector reaches the faulty upstream in memory.
    return Proxy(make_config(1, server=SERVER, **UPSTREAM), connect=upstream.connector(nursery))


def guarded(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A hang fails the test after 300 s of (mock) time instead of blocking the suite."""

    @functools.wraps(test)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        with trio.fail_after(300):
            await test(*args, **kwargs)

    return wrapper


def _statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _pool_in_use(proxy: Proxy) -> int:
    return proxy.forwarder.upstreams["app"].pools[0].statistics().in_use


@guarded
async def test_incomplete_head_is_408_and_close_at_header_timeout(nursery, autojump_clock, proxy):
    client = memory_client(nursery, proxy)
    start = trio.current_time()
    await client.send_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n")
    reply = await read_until_close(client)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert _statuses(reply) == [408]
    assert b"\r\nconnection: close\r\n" in reply.lower()


@guarded
async def test_slowloris_head_is_not_kept_alive_by_dripping(nursery, autojump_clock, proxy):
    client = memory_client(nursery, proxy)
    start = trio.current_time()

    async def drip() -> None:
        head = b"GET /ok HTTP/1.1\r\nHost: a\r\n" + b"X-Drip: " + b"d" * 100
        try:
            for i in range(len(head)):
                await client.send_all(head[i : i + 1])
                await trio.sleep(1.0)
        except trio.BrokenResourceError:
            pass  # the proxy hung up on us

    nursery.start_soon(drip)
    reply = await read_until_close(client)
    # One byte a second keeps arriving, but the head had 10 s in total, not 10 s per byte.
    assert trio.current_time() - start == pytest.approx(10.0)
    assert _statuses(reply) == [408]


@guarded
async def test_idle_keepalive_connection_closes_at_keepalive_timeout(
    nursery, autojump_clock, proxy
):
    client = memory_client(nursery, proxy)
    await client.send_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    first = b""
    while not first.endswith(b"\r\n\r\nok"):
        first += await client.receive_some(65536)
    assert _statuses(first) == [200]
    idle_from = trio.current_time()
    assert await read_until_close(client) == b""
    assert trio.current_time() - idle_from == pytest.approx(75.0)


@guarded
async def test_stalled_body_is_408_and_frees_the_upstream_at_body_timeout(
    nursery, autojump_clock, proxy, upstream
):
    client = memory_client(nursery, proxy)
    await client.send_all(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
    await trio.sleep(59.0)
    # The head and half the body went upstream; the upstream waits for the rest.
    assert upstream.connections_open == 1 and _pool_in_use(proxy) == 1
    start = trio.current_time() - 59.0
    reply = await read_until_close(client)
    assert trio.current_time() - start == pytest.approx(60.0)
    assert _statuses(reply) == [408]
    assert b"\r\nconnection: close\r\n" in reply.lower()
    # At that same moment the upstream connection was closed, not pooled.
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() - start == pytest.approx(60.0)
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0
    assert [(r.body, r.complete) for r in upstream.requests] == [(b"hello", False)]


@guarded
async def test_body_timeout_is_silence_not_total_time(nursery, autojump_clock, proxy, upstream):
    client = memory_client(nursery, proxy)
    await client.send_all(b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n")
    for byte in b"slow":  # 4 x 50 s: 200 s in all, never 60 s of silence
        await trio.sleep(50.0)
        await client.send_all(bytes([byte]))
    reply = b""
    while not reply.endswith(b"\r\n\r\nok"):
        reply += await client.receive_some(65536)
    assert _statuses(reply) == [200]
    assert [(r.body, r.complete) for r in upstream.requests] == [(b"slow", True)]


@guarded
async def test_client_that_stops_reading_frees_the_upstream_at_write_timeout(
    nursery, autojump_clock, proxy, upstream
):
    client = memory_client(nursery, proxy, lockstep=True)
    await client.send_all(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n")
    start = trio.current_time()
    await trio.sleep(29.0)
    assert upstream.connections_open == 1 and _pool_in_use(proxy) == 1
    # Never reading: the proxy's first write blocks, and 30 s later it gives up on us, and
    # on the endless upstream response with us.
    await trio.sleep(1.5)
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0
    assert upstream.faults["endless"] == 1
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
        with trio.fail_after(1):
            while True:
                await client.send_all(b"x")
    assert trio.current_time() - start < 32.0
    await client.aclose()


@guarded
async def test_silent_upstream_is_504_at_response_header_timeout(
    nursery, autojump_clock, proxy, upstream
):
    client = memory_client(nursery, proxy)
    start = trio.current_time()
    await client.send_all(b"GET /hang HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reply = await read_until_close(client)
    assert trio.current_time() - start == pytest.approx(20.0)
    assert _statuses(reply) == [504]
    assert b"error=http_response_timeout" in reply
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0


@guarded
async def test_head_that_drips_past_the_client_watch_start_is_relayed_whole(
    nursery, autojump_clock, proxy, upstream
):
    # The wait for the head has two parts (before and after the client watch starts, at
    # WATCH_AFTER): bytes of the head that came in the first are kept for the second.
    upstream.drip_interval = 0.01
    client = memory_client(nursery, proxy)
    start = trio.current_time()
    await client.send_all(b"GET /drip HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reply = await read_until_close(client)
    elapsed = trio.current_time() - start
    assert elapsed > 3 * WATCH_AFTER  # the head's 38 bytes took 0.38 s
    assert _statuses(reply) == [200]
    assert reply.endswith(b"\r\n\r\ndripped")


@guarded
async def test_client_leaving_while_the_upstream_is_silent_is_seen_once_watched(
    nursery, autojump_clock, upstream
):
    # On a reused connection, the client is watched only once the head has been waited for
    # WATCH_AFTER; from then its leaving cancels the exchange, and the upstream connection
    # is closed, not pooled.
    records: list[ExchangeRecord] = []
    proxy = Proxy(
        make_config(1, server=SERVER, **UPSTREAM),
        connect=upstream.connector(nursery),
        observers=(records.append,),
    )
    client = memory_client(nursery, proxy)
    # A first exchange leaves a connection in the pool (a connect is watched at once).
    await client.send_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _statuses(await client.receive_some(RECEIVE_SIZE)) == [200]
    await trio.sleep(1)
    start = trio.current_time()
    await client.send_all(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
    await trio.sleep(0.01)
    assert upstream.requests and upstream.connections_open == 1
    await client.aclose()
    await trio.sleep_until(start + WATCH_AFTER - 0.01)
    assert upstream.connections_open == 1 and len(records) == 1
    await trio.sleep_until(start + WATCH_AFTER + 0.01)
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0
    assert [r.error for r in records] == ["", "client_disconnected"]


@guarded
async def test_upstream_silent_mid_body_is_cut_at_read_timeout(
    nursery, autojump_clock, proxy, upstream
):
    client = memory_client(nursery, proxy)
    start = trio.current_time()
    await client.send_all(b"GET /hang-mid-body HTTP/1.1\r\nHost: a\r\n\r\n")
    reply = await read_until_close(client)
    assert trio.current_time() - start == pytest.approx(40.0)
    # The head went out promising 1000 bytes; 10 came, then the stream was cut.
    assert _statuses(reply) == [200]
    assert reply.endswith(b"\r\n\r\n" + b"x" * 10)
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() - start == pytest.approx(40.0)
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0


@guarded
async def test_client_leaving_mid_body_is_seen_once_the_body_took_the_watch_time(
    nursery, autojump_clock, upstream
):
    # The rest of a body that is not there with the head: the client is watched once it
    # has taken WATCH_AFTER; then its leaving cuts the exchange and the upstream connection.
    records: list[ExchangeRecord] = []
    proxy = Proxy(
        make_config(1, server=SERVER, **UPSTREAM),
        connect=upstream.connector(nursery),
        observers=(records.append,),
    )
    client = memory_client(nursery, proxy)
    await client.send_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _statuses(await client.receive_some(RECEIVE_SIZE)) == [200]
    await trio.sleep(1)
    start = trio.current_time()
    await client.send_all(b"GET /hang-mid-body HTTP/1.1\r\nHost: a\r\n\r\n")
    assert _statuses(await client.receive_some(RECEIVE_SIZE)) == [200]  # head and 10 bytes
    await client.aclose()
    await trio.sleep_until(start + WATCH_AFTER - 0.01)
    assert upstream.connections_open == 1 and len(records) == 1
    await trio.sleep_until(start + WATCH_AFTER + 0.01)
    assert upstream.connections_open == 0 and _pool_in_use(proxy) == 0
    assert [r.error for r in records] == ["", "client_disconnected"]


@guarded
async def test_queued_request_is_503_with_retry_after_at_queue_timeout(
    nursery, autojump_clock, upstream
):
    proxy = Proxy(
        make_config(1, server=SERVER, **UPSTREAM, max_connections=1, queue_timeout=5.0),
        connect=upstream.connector(nursery),
    )
    await nursery.start(proxy.run_pools)  # the pool's reaper times the queue out
    holder = memory_client(nursery, proxy)
    await holder.send_all(b"GET /hang HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    await trio.testing.wait_all_tasks_blocked()  # the one connection is taken
    queued = memory_client(nursery, proxy)
    start = trio.current_time()
    await queued.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reply = await read_until_close(queued)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert _statuses(reply) == [503]
    assert re.search(rb"\r\nretry-after: \d+\r\n", reply, re.IGNORECASE), reply
    pool = proxy.forwarder.upstreams["app"].pools[0].statistics()
    assert (pool.queue_timeouts, pool.waiting, pool.in_use) == (1, 0, 1)
    assert _statuses(await read_until_close(holder)) == [504]  # at response_header_timeout


@guarded
async def test_silent_connection_is_408_at_header_timeout(nursery, autojump_clock, proxy):
    client = memory_client(nursery, proxy, h2=True)
    start = trio.current_time()
    reply = await read_until_close(client)
    # One header_timeout from the connection's start, the wait for its first byte included.
    assert trio.current_time() - start == pytest.approx(10.0)
    assert _statuses(reply) == [408]


@guarded
async def test_partial_h2_preface_is_408_at_header_timeout(nursery, autojump_clock, proxy):
    client = memory_client(nursery, proxy, h2=True)
    start = trio.current_time()
    await trio.sleep(4.0)
    await client.send_all(b"PRI * HTTP/2.0\r\n")  # and the rest of the preface never comes
    reply = await read_until_close(client)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert _statuses(reply) == [408]


@guarded
async def test_h2_header_block_left_open_is_cut_at_header_timeout(
    nursery, autojump_clock, proxy, upstream
):
    client = H2Client(memory_client(nursery, proxy, h2=True))
    client.conn.initiate_connection()
    await client.flush()
    # The handshake completes both ways (our SETTINGS acknowledged, theirs acknowledged by
    # receive()), so nothing but the header block is pending.
    await client.until(
        lambda: any(isinstance(e, h2.events.SettingsAcknowledged) for e in client.events)
    )
    await trio.sleep(30.0)  # idle, within keepalive_timeout: no clock runs for a head yet
    block = client.conn.encoder.encode(client.request_headers("GET", "/ok"))
    start = trio.current_time()
    await client.send_raw(HeadersFrame(1, data=block[:5]).serialize())  # no END_HEADERS
    await client.read_until_closed()
    assert trio.current_time() - start == pytest.approx(10.0)
    assert client.goaway is not None and client.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert upstream.requests == []


@pytest.mark.parametrize("window", [0, 65535])
@guarded
async def test_h2_bytes_out_counts_what_reached_a_client_that_stopped_reading(
    nursery, autojump_clock, upstream, window
):
    records: list[ExchangeRecord] = []
    proxy = Proxy(
        make_config(1, server=SERVER, **UPSTREAM),
        connect=upstream.connector(nursery),
        observers=(records.append,),
    )
    client = H2Client(memory_client(nursery, proxy, h2=True), auto_ack=False)
    client.conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    client.conn.initiate_connection()
    await client.flush()
    reply = await client.get("/ok?size=300000")
    # The client's window never opens (beyond its first 64 KiB): reset at write_timeout.
    assert (reply.status, reply.reset_code) == (200, ErrorCodes.CANCEL)
    await trio.testing.wait_all_tasks_blocked()
    assert len(reply.body) == window
    assert [record.bytes_out for record in records] == [window]
