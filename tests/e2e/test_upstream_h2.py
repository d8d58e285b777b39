"""HTTP/2 to the upstream, against a hand-driven h2 server on real sockets (tests/support/h2upstream.py):
streams multiplexed on few connections, the stream and connection limits and the wait queue,
GOAWAY and REFUSED_STREAM replayed, resets relayed both ways, flow control both ways, the
idle timeout (on a MockClock), and servers that do not speak HTTP/2."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing
from h2.errors import ErrorCodes

from pooled_proxy.config import Config, RouteConfig, ServerAddress, ServerConfig, UpstreamConfig
from tests.support.h2client import H2Client
from tests.support.h2upstream import H2Upstream, ServerConnection, UpstreamRequest, answer
from tests.support.helpers import HOST, H11Client, start_proxy


def h2_config(port: int, **upstream: Any) -> Config:
    app = UpstreamConfig(name="app", servers=(ServerAddress(HOST, port, h2=True),), **upstream)
    return Config(
        server=ServerConfig(listen=(ServerAddress(HOST, 0),)),
        upstreams={"app": app},
        routes=(RouteConfig(upstream="app"),),
    )


class Gate:
    """Holds every request until opened, then answers it."""

    def __init__(self) -> None:
        self.open = trio.Event()

    async def __call__(self, connection: ServerConnection, request: UpstreamRequest) -> None:
        await self.open.wait()
        if request.reset_code is None:
            await answer(connection, request)


async def test_concurrent_requests_share_one_connection(nursery: trio.Nursery) -> None:
    gate = Gate()
    upstream = await H2Upstream(gate).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        ids = [await client.start("GET", f"/r{i}") for i in range(50)]
        with trio.fail_after(5):
            await upstream.wait_for(lambda: upstream.in_flight == 50)
        gate.open.set()
        replies = [await client.response(i) for i in ids]
    assert [r.status for r in replies] == [200] * 50
    assert [bytes(r.body) for r in replies] == [f"/r{i}".encode() for i in range(50)]
    assert len(upstream.connections) == 1
    stats = proxy.pool().statistics()
    assert (stats.opened, stats.reused) == (1, 49)
    via = replies[0].header(b"via")
    assert via is not None and via.endswith(b"2 pooled-proxy")


async def test_stream_and_connection_limits_and_the_queue_bound(nursery: trio.Nursery) -> None:
    """2 streams per connection (the server's SETTINGS), 2 connections, 3 waiting: the 8th
    concurrent request is answered 503 at once; the waiting ones go when streams free up."""
    gate = Gate()
    upstream = await H2Upstream(gate, max_streams=2).start(nursery)
    config = h2_config(upstream.port, max_connections=2, queue_size=3, queue_timeout=10.0)
    proxy = await start_proxy(nursery, config)
    pool = proxy.pool()
    async with await H2Client.connect(proxy.port) as client:
        ids = []
        for i in range(4):
            ids.append(await client.start("GET", f"/r{i}"))
            with trio.fail_after(5):
                await upstream.wait_for(lambda i=i: upstream.in_flight == i + 1)
        for i in range(4, 7):
            ids.append(await client.start("GET", f"/r{i}"))
        with trio.fail_after(5):
            await upstream.wait_for(lambda: pool.statistics().waiting == 3)
        rejected = await client.response(await client.start("GET", "/over"))
        assert rejected.status == 503
        assert rejected.header(b"retry-after") == b"1"
        assert upstream.in_flight == 4
        gate.open.set()
        replies = [await client.response(i) for i in ids]
    assert [r.status for r in replies] == [200] * 7
    assert (len(upstream.connections), upstream.max_in_flight) == (2, 4)
    stats = pool.statistics()
    assert (stats.opened, stats.queue_rejected, stats.queue_waits) == (2, 1, 3)


@pytest.mark.parametrize("how", ["goaway", "refused_stream"])
async def test_unprocessed_requests_are_replayed(nursery: trio.Nursery, how: str) -> None:
    """The first connection takes two POSTs, then goes away having processed only the first
    (a GOAWAY naming it as the last, or REFUSED_STREAM on the second); that one finishes
    on the first connection after the GOAWAY, the second is sent again on a new one."""
    both = trio.Event()

    async def handler(connection: ServerConnection, request: UpstreamRequest) -> None:
        await request.ended.wait()
        if connection.index == 0 and request.stream_id <= 3:  # the first two requests
            if len(connection.requests) < 2:
                await both.wait()
            else:
                both.set()
                first = min(connection.requests)
                if how == "goaway":
                    await connection.goaway(last_stream_id=first)
                else:
                    await connection.reset(request.stream_id, ErrorCodes.REFUSED_STREAM)
                if request.stream_id != first:
                    return
        await connection.respond(request.stream_id, body=b"done " + bytes(request.body))

    upstream = await H2Upstream(handler).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        first = await client.start("POST", "/a", body=b"one")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: len(upstream.requests) == 1)
        second = await client.start("POST", "/b", body=b"two")
        with trio.fail_after(5):
            replies = [await client.response(first), await client.response(second)]
    assert [(r.status, bytes(r.body)) for r in replies] == [(200, b"done one"), (200, b"done two")]
    # After a GOAWAY the connection takes no new stream; after REFUSED_STREAM it does.
    replayed_on = 1 if how == "goaway" else 0
    assert [r.connection.index for r in upstream.requests] == [0, 0, replayed_on]
    assert proxy.pool().statistics().opened == 1 + replayed_on


@pytest.mark.parametrize(
    ("code", "relayed"),
    [
        (ErrorCodes.INTERNAL_ERROR, ErrorCodes.INTERNAL_ERROR),
        (ErrorCodes.CANCEL, ErrorCodes.CANCEL),
        (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.ENHANCE_YOUR_CALM),
        # About the proxy's connection, not the client's; a processed request; a cut response.
        (ErrorCodes.FLOW_CONTROL_ERROR, ErrorCodes.INTERNAL_ERROR),
        (ErrorCodes.REFUSED_STREAM, ErrorCodes.INTERNAL_ERROR),
        (ErrorCodes.NO_ERROR, ErrorCodes.INTERNAL_ERROR),
    ],
)
async def test_upstream_reset_mid_response_is_relayed_with_its_code(
    nursery: trio.Nursery, code: ErrorCodes, relayed: ErrorCodes
) -> None:
    async def handler(connection: ServerConnection, request: UpstreamRequest) -> None:
        if request.header(b":path") == b"/next":
            await answer(connection, request)
            return
        await connection.respond(request.stream_id, body=b"partial", end=False)
        await connection.reset(request.stream_id, code)

    upstream = await H2Upstream(handler).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            reply = await client.get("/")
            ok = await client.get("/next")  # the same connection serves the next one
    assert reply.status == 200 and bytes(reply.body) == b"partial"
    assert (reply.reset_code, reply.ended) == (relayed, False)
    assert ok.status == 200
    assert len(upstream.requests) == 2  # never sent again: the response had begun
    assert proxy.pool().statistics().opened == 1


async def test_upstream_reset_before_the_response_is_a_502_naming_it_and_not_replayed(
    nursery: trio.Nursery,
) -> None:
    """A bodiless POST reset (CANCEL) on a reused connection: the server may have acted on
    it, and the connection is alive (not the keep-alive race), so it is not sent again."""

    async def handler(connection: ServerConnection, request: UpstreamRequest) -> None:
        if request.header(b":method") == b"POST":
            await connection.reset(request.stream_id, ErrorCodes.CANCEL)
        else:
            await answer(connection, request)

    upstream = await H2Upstream(handler).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            first = await client.get("/warm")  # the POST reuses this connection
            reply = await client.response(await client.start("POST", "/orders"))
    assert first.status == 200
    assert reply.status == 502 and reply.ended
    assert reply.header(b"proxy-status") == (
        b'pooled-proxy; error=http_response_incomplete; details="upstream reset the stream '
        b'(CANCEL)"'
    )
    assert [r.header(b":path") for r in upstream.requests] == [b"/warm", b"/orders"]
    assert proxy.pool().statistics().opened == 1


async def test_a_stream_refused_twice_is_a_502_naming_the_reset(nursery: trio.Nursery) -> None:
    async def refuses(connection: ServerConnection, request: UpstreamRequest) -> None:
        await connection.reset(request.stream_id, ErrorCodes.REFUSED_STREAM)

    upstream = await H2Upstream(refuses).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        with trio.fail_after(5):
            reply = await client.response(await client.start("POST", "/orders", body=b"{}"))
    assert reply.status == 502
    assert reply.header(b"proxy-status") == (
        b'pooled-proxy; error=http_response_incomplete; details="upstream reset the stream '
        b'(REFUSED_STREAM)"'
    )
    assert len(upstream.requests) == 2  # sent again once: it was not processed


async def test_client_reset_resets_the_upstream_stream_only(nursery: trio.Nursery) -> None:
    held = Gate()
    upstream = await H2Upstream(held).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        stream_id = await client.start("GET", "/held")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: upstream.in_flight == 1)
        client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        await client.flush()
        with trio.fail_after(5):
            await upstream.requests[0].reset.wait()
        assert upstream.requests[0].reset_code == ErrorCodes.CANCEL
        held.open.set()
        with trio.fail_after(5):
            reply = await client.get("/next")
    assert reply.status == 200
    assert len(upstream.connections) == 1


async def test_response_body_backpressure(nursery: trio.Nursery) -> None:
    """A client that never opens its window stops the upstream's stream after about one
    window per hop: the proxy holds no more than its own stream window of the body."""
    size = 4 * 1024 * 1024

    async def handler(connection: ServerConnection, request: UpstreamRequest) -> None:
        await connection.respond(request.stream_id, body=b"x" * size)

    upstream = await H2Upstream(handler).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port, auto_ack=False) as client:
        await client.start("GET", "/big")
        nursery.start_soon(client.read_until_closed)
        with trio.fail_after(5):
            # the server's window for the stream is shut: it is blocked
            await upstream.wait_for(
                lambda: (
                    bool(upstream.requests)
                    and upstream.connections[0].h2.local_flow_control_window(1) == 0
                )
            )
        await trio.sleep(0.1)
        assert upstream.data_sent < 512 * 1024  # client window + proxy stream window + a frame
        assert client.data_bytes <= 65535


async def test_request_body_backpressure(nursery: trio.Nursery) -> None:
    """An upstream that never reads the body (never opens its window) stops the client's
    upload too: the proxy credits the client only what went upstream."""
    upstream = await H2Upstream(Gate(), auto_ack=False).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        stream_id = await client.start("POST", "/upload", end=False)
        sent = 0
        with trio.fail_after(5):
            while True:
                window = client.conn.local_flow_control_window(stream_id)
                if window:
                    chunk = min(window, 16384)
                    client.conn.send_data(stream_id, b"u" * chunk)
                    await client.flush()
                    sent += chunk
                    continue
                # Blocked: wait a moment for a WINDOW_UPDATE that does not come.
                with trio.move_on_after(0.3) as quiet:
                    await client.receive()
                if quiet.cancelled_caught:
                    break
    # The upstream's window (64 KiB) plus what the proxy holds (about one chunk) and the
    # client's window on the proxy (64 KiB): nowhere near the whole body.
    assert sent < 200 * 1024
    assert upstream.bytes_received < 100 * 1024


async def test_idle_connection_closed_after_idle_timeout(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """On a MockClock that moves only when told (the sockets are real: no autojump)."""
    clock = mock_clock
    upstream = await H2Upstream().start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port, idle_timeout=10.0))
    async with await H11Client.connect(proxy.port) as client:
        assert (await client.request("GET", "/one")).status == 200
    pool = proxy.pool()
    clock.jump(9.5)
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics().idle == 1
    clock.jump(1.0)
    await upstream.connections[0].closed.wait()  # real I/O, no timer: the clock is frozen
    stats = pool.statistics()
    assert (stats.idle, stats.closed) == (0, {"idle_timeout": 1})


async def test_http1_server_behind_h2c_is_a_clear_502(
    nursery: trio.Nursery, demo_upstream: tuple[Any, int]
) -> None:
    _, port = demo_upstream
    proxy = await start_proxy(nursery, h2_config(port))
    async with await H11Client.connect(proxy.port) as client:
        reply = await client.request("GET", "/")
    assert reply.status == 502
    assert b"http_protocol_error" in reply.headers[b"proxy-status"]


async def test_a_reload_lets_streams_in_flight_finish(nursery: trio.Nursery) -> None:
    """The upstream's settings change: its old pool retires, and its connection carries the
    stream in flight to its end before it closes; new requests open a new connection."""
    gate = Gate()
    upstream = await H2Upstream(gate).start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port))
    async with await H2Client.connect(proxy.port) as client:
        held = await client.start("GET", "/held")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: upstream.in_flight == 1)
        summary = proxy.proxy.reload(h2_config(upstream.port, idle_timeout=30.0))
        assert summary.replaced == ("app",)
        await trio.sleep(0.05)  # the old pool's reaper is cancelled meanwhile
        assert not upstream.connections[0].closed.is_set()
        gate.open.set()
        with trio.fail_after(5):
            reply = await client.response(held)
            await upstream.connections[0].closed.wait()
            after = await client.get("/after")
    assert (reply.status, bytes(reply.body)) == (200, b"/held")
    assert (after.status, len(upstream.connections)) == (200, 2)


async def test_health_probes_speak_http2_to_an_h2_upstream(nursery: trio.Nursery) -> None:
    """Each probe is a stream on a connection of its own, closed after it."""
    from pooled_proxy.config import HealthCheckConfig

    check = HealthCheckConfig(path="/healthz", interval=0.05, timeout=1.0, rise=1, fall=1)
    upstream = await H2Upstream().start(nursery)
    proxy = await start_proxy(nursery, h2_config(upstream.port, health_check=check))
    probes = proxy.proxy.forwarder.upstreams["app"].probes[0]
    assert probes is not None
    with trio.fail_after(5):
        await upstream.wait_for(lambda: probes.results["pass"] >= 2)
        await upstream.wait_for(lambda: upstream.open_connections == 0)
    assert upstream.requests[0].header(b":path") == b"/healthz"
    assert len(upstream.connections) >= 2
    assert proxy.pool().statistics().opened == 0  # outside the pool


async def test_a_drain_answers_requests_still_queued_with_503(nursery: trio.Nursery) -> None:
    gate = Gate()
    upstream = await H2Upstream(gate, max_streams=1).start(nursery)
    config = h2_config(upstream.port, max_connections=1, queue_timeout=30.0)
    config = replace(config, server=replace(config.server, drain_timeout=1.0))
    proxy = await start_proxy(nursery, config)
    async with await H2Client.connect(proxy.port) as client:
        first = await client.start("GET", "/first")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: upstream.in_flight == 1)
        queued = await client.start("GET", "/queued")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: proxy.pool().statistics().waiting == 1)
        proxy.proxy.begin_drain()
        with trio.fail_after(5):
            reply = await client.response(queued)
        assert reply.status == 503
        gate.open.set()
        with trio.fail_after(5):
            assert (await client.response(first)).status == 200


async def test_a_request_queued_past_queue_timeout_is_answered_503(nursery: trio.Nursery) -> None:
    # The pool's reaper times the queue out (no timer per waiting request).
    gate = Gate()
    upstream = await H2Upstream(gate, max_streams=1).start(nursery)
    proxy = await start_proxy(
        nursery, h2_config(upstream.port, max_connections=1, queue_timeout=0.3)
    )
    async with await H2Client.connect(proxy.port) as client:
        first = await client.start("GET", "/first")
        with trio.fail_after(5):
            await upstream.wait_for(lambda: upstream.in_flight == 1)
        queued_at = trio.current_time()
        queued = await client.start("GET", "/queued")
        with trio.fail_after(5):
            reply = await client.response(queued)
        assert reply.status == 503
        assert trio.current_time() - queued_at >= 0.3
        stats = proxy.pool().statistics()
        assert (stats.queue_timeouts, stats.waiting, stats.in_use) == (1, 0, 1)
        gate.open.set()
        with trio.fail_after(5):
            assert (await client.response(first)).status == 200
