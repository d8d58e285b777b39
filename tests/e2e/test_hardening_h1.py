"""The HTTP/1.1 front end under attack, on real sockets: request smuggling is refused with a
400 (501 for an unknown transfer coding) and a closed connection before the upstream sees a
request; the header, request-count and connection limits hold; running out of file
descriptors (EMFILE) is survived."""

from __future__ import annotations

import os
import re
import resource

import pytest
import trio

from tests.support.daemon import DaemonConfig, running_daemon
from tests.support.faulty_upstream import FaultyUpstream, open_fd_count, wait_until
from tests.support.helpers import HOST, H11Client, make_config, raw_exchange, start_proxy

H = b"Host: test.local\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"

# name -> (request bytes, expected status). Heads h11 alone would accept are marked (h11 ok).
SMUGGLING = {
    "cl_and_te": (
        b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n" + CHUNKED + b"\r\n0\r\n\r\n",
        400,
    ),
    "repeated_equal_cl (h11 ok)": (
        b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        400,
    ),
    "cl_list (h11 ok)": (b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 2, 2\r\n\r\nhi", 400),
    "differing_cl": (
        b"POST /ok HTTP/1.1\r\n" + H + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\nhi!",
        400,
    ),
    "obs_fold (h11 ok)": (b"GET /ok HTTP/1.1\r\n" + H + b"X-Folded: a\r\n b\r\n\r\n", 400),
    "obs_fold_te (h11 ok)": (
        b"POST /ok HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "space_before_colon": (
        b"GET /ok HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n",
        400,
    ),
    "nul_in_value": (b"GET /ok HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    "cr_in_value": (b"GET /ok HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    "lf_in_value (h11 ok)": (
        b"GET /ok HTTP/1.1\r\n" + H + b"X-A: a\nContent-Length: 40\r\n\r\n",
        400,
    ),
    "lf_only_lines (h11 ok)": (b"GET /ok HTTP/1.1\nHost: test.local\n\n", 400),
    "te_in_http10 (h11 ok)": (b"POST /ok HTTP/1.0\r\n" + CHUNKED + b"\r\n0\r\n\r\n", 400),
    "unknown_te": (b"POST /ok HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "bad_chunk_size": (
        b"POST /ok HTTP/1.1\r\n" + H + CHUNKED + b"\r\nxyz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk_size_overflow (h11 ok)": (
        b"POST /ok HTTP/1.1\r\n" + H + CHUNKED + b"\r\n10000000000000005\r\nhello\r\n",
        400,
    ),
    "chunk_not_crlf_terminated": (
        b"POST /ok HTTP/1.1\r\n" + H + CHUNKED + b"\r\n5\r\nhelloXX0\r\n\r\n",
        400,
    ),
    "trailer_obs_fold (h11 ok)": (
        b"POST /ok HTTP/1.1\r\n" + H + CHUNKED + b"\r\n0\r\nX-T: a\r\n b\r\n\r\n",
        400,
    ),
}


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> tuple[FaultyUpstream, int]:
    faulty = FaultyUpstream()
    port = await nursery.start(faulty.serve)
    return faulty, port


def _status(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert match, reply[:200]
    return int(match.group(1))


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_smuggling_attempt_is_refused_and_the_connection_closed(nursery, upstream, name):
    faulty, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    data, status = SMUGGLING[name]
    with trio.fail_after(5):
        # A good request first, on the same connection: the bad one must not ride behind it.
        reply = await raw_exchange(proxy.port, b"GET /ok HTTP/1.1\r\n" + H + b"\r\n" + data)
    first, _, rest = reply.partition(b"\r\n\r\nok")
    assert _status(first) == 200
    assert _status(rest) == status, rest
    head = rest.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\nconnection: close" in head and b"\r\nproxy-status: pooled-proxy; error=" in head
    # raw_exchange returned, so the proxy closed the connection. The upstream saw the good
    # request, and of the bad one at most a head whose body never completed.
    assert [r.complete for r in faulty.requests][:1] == [True]
    assert all(not r.complete for r in faulty.requests[1:])
    if not name.startswith(("bad_chunk", "chunk_", "trailer_")):
        assert len(faulty.requests) == 1  # a bad head is never forwarded at all
    assert proxy.pool().statistics().in_use == 0


async def test_body_violation_cuts_the_upstream_connection_too(nursery, upstream):
    faulty, port = upstream
    proxy = await start_proxy(nursery, make_config(port))
    fds_before = open_fd_count()
    with trio.fail_after(5):
        reply = await raw_exchange(
            proxy.port,
            b"POST /ok HTTP/1.1\r\n" + H + CHUNKED + b"\r\n5\r\nhello\r\n" + b"1" * 20 + b"\r\n",
        )
        assert _status(reply) == 400
        # The upstream got the head and 5 body bytes, then its connection was closed, so it
        # never saw a complete (or smuggled) request.
        await wait_until(lambda: faulty.connections_open == 0 and open_fd_count() == fds_before)
    assert [(r.body, r.complete) for r in faulty.requests] == [(b"hello", False)]
    assert proxy.pool().statistics().idle == 0


async def test_header_count_and_size_limits_are_431(nursery, upstream):
    faulty, port = upstream
    config = make_config(port, server={"max_header_count": 20, "max_header_bytes": 4096})
    proxy = await start_proxy(nursery, config)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(21))
    huge = b"X-Big: " + b"a" * 5000 + b"\r\n"
    with trio.fail_after(5):
        for extra in (many, huge):
            reply = await raw_exchange(proxy.port, b"GET /ok HTTP/1.1\r\n" + H + extra + b"\r\n")
            assert _status(reply) == 431
        ok = await raw_exchange(
            proxy.port,
            b"GET /ok HTTP/1.1\r\n"
            + H
            + many[: many.index(b"X-H18")]
            + b"Connection: close\r\n\r\n",
        )
        assert _status(ok) == 200
    assert len(faulty.requests) == 1


async def test_per_connection_request_limit_closes_after_the_last(nursery, upstream):
    _, port = upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_requests_per_connection": 2}))
    with trio.fail_after(5):
        reply = await raw_exchange(proxy.port, (b"GET /ok HTTP/1.1\r\n" + H + b"\r\n") * 3)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"200"]  # the third pipelined request is not served
    assert reply.lower().count(b"\r\nconnection: close\r\n") == 1


async def test_over_max_connections_is_503_and_close_then_recovers(nursery, upstream):
    _, port = upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_connections": 3}))
    with trio.fail_after(5):
        held = [await H11Client.connect(proxy.port) for _ in range(3)]
        try:
            for client in held:  # all three are served (keep-alive, still open)
                assert (await client.request("GET", "/ok")).status == 200
            for _ in range(5):
                reply = await raw_exchange(proxy.port, b"GET /ok HTTP/1.1\r\n" + H + b"\r\n")
                assert _status(reply) == 503
                assert b"error=connection_limit_reached" in reply
                assert b"\r\nconnection: close\r\n" in reply.lower()
            assert (await held[0].request("GET", "/ok")).status == 200
        finally:
            await held[0].aclose()
        await wait_until(lambda: proxy.proxy.client_connections == 2)
        assert (
            _status(
                await raw_exchange(
                    proxy.port, b"GET /ok HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
                )
            )
            == 200
        )
        for client in held[1:]:
            await client.aclose()


def _fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_running_out_of_file_descriptors_is_survived(nursery, upstream, tmp_path):
    """With RLIMIT_NOFILE lowered on the running daemon, a flood of idle connections hits
    EMFILE: accept backs off instead of crashing, a request that needs an upstream socket
    gets a 502, and once the flood leaves, requests are served again."""
    _, port = upstream
    config = DaemonConfig(upstreams={"app": port}, server={"header_timeout": "30s"})
    async with running_daemon(nursery, tmp_path, config) as daemon:
        pid = daemon.process.pid
        with trio.fail_after(15):
            # Accepted before the squeeze; its upstream connection is closed (not pooled)
            # after the garbage, so its next request needs a new socket.
            first = await H11Client.connect(daemon.port)
            assert (await first.request("GET", "/garbage")).status == 502
            limit = _fds_of(pid) + 6
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
            flood = [await trio.open_tcp_stream(HOST, daemon.port) for _ in range(20)]
            try:
                await daemon.wait_for_line(r"EMFILE")
                await wait_until(lambda: _fds_of(pid) >= limit, timeout=5)
                reply = await first.request("GET", "/ok")  # no fd for an upstream socket
                assert reply.status == 502
                assert b"error=connection_refused" in reply.headers[b"proxy-status"]
                assert daemon.process.returncode is None
            finally:
                for stream in flood:
                    await stream.aclose()
            await first.aclose()
            # The flood is gone: its connections are accepted, see EOF and close; then a
            # fresh client is served normally.
            await wait_until(lambda: _fds_of(pid) < limit - 2, timeout=5)
            async with await H11Client.connect(daemon.port) as again:
                assert (await again.request("GET", "/ok")).status == 200
        assert daemon.process.returncode is None


async def test_head_request_refused_before_forwarding_still_gets_its_answer(nursery, upstream):
    """A HEAD over max_body_bytes got no answer at all: the 413's body, refused by h11 on a
    HEAD response, made the whole answer fail."""
    _, port = upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_body_bytes": 10}))
    with trio.fail_after(5):
        reply = await raw_exchange(
            proxy.port, b"HEAD /ok HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n"
        )
    assert re.match(rb"HTTP/1\.1 413 [A-Z][a-z]+ ", reply), reply  # with its reason phrase
    assert reply.endswith(b"\r\n\r\n")  # head only
