"""Streaming through the proxy: SSE timing, long streams, client disconnects, backpressure,
request body limits, and memory on large bodies. Real sockets on 127.0.0.1, real clock.

SSE timing is asserted on measured latencies: the demo upstream stamps every event with the
wall-clock time it wrote it, and the client compares that with when the event arrived.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import pytest
import trio

from pooled_proxy.exchange import ExchangeRecord
from tests.support.h2client import H2Client
from tests.support.helpers import HOST, H11Client, make_config, sse_request, start_proxy, wait_until
from tests.support.memory import MIB, reset_peak_rss, status_kib
from tests.support.scripted_upstream import SSE_HEAD, chunk

# -- tools -------------------------------------------------------------------------------------


@dataclass
class SSEArrival:
    n: int
    sent: float  # wall clock, stamped by the upstream when it wrote the event
    arrived: float  # wall clock, when the client had the whole event

    @property
    def latency(self) -> float:
        return self.arrived - self.sent


def take_events(buffer: bytes, now: float, arrivals: list[SSEArrival]) -> bytes:
    """Move the complete demo-upstream events out of ``buffer``; return what is left."""
    while b"\n\n" in buffer:
        block, buffer = buffer.split(b"\n\n", 1)
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        payload = json.loads(data[0])
        arrivals.append(SSEArrival(payload["n"], payload["t"], now))
    return buffer


async def read_sse(client: H11Client, count: int) -> tuple[h11.Response, list[SSEArrival]]:
    """Read an SSE response of the demo upstream, timing each event as it completes."""
    response = await client.next_event()
    assert isinstance(response, h11.Response), response
    arrivals: list[SSEArrival] = []
    buffer = b""
    while len(arrivals) < count:
        event = await client.next_event()
        assert isinstance(event, h11.Data), event
        buffer = take_events(buffer + event.data, time.time(), arrivals)
    return response, arrivals


async def read_sse_h2(client: H2Client, stream_id: int, count: int) -> list[SSEArrival]:
    reply = client.replies[stream_id]
    arrivals: list[SSEArrival] = []
    buffer = b""
    seen = 0
    while len(arrivals) < count:
        assert await client.receive(), "connection closed"
        assert reply.reset_code is None, reply.reset_code
        buffer = take_events(buffer + bytes(reply.body[seen:]), time.time(), arrivals)
        seen = len(reply.body)
    return arrivals


def assert_prompt(arrivals: list[SSEArrival], requested: float, count: int) -> None:
    assert [a.n for a in arrivals] == list(range(1, count + 1))
    latencies = [a.latency for a in arrivals]
    # Each event is written as soon as it arrives. Waiting for more bytes would delay events
    # by the 100 ms interval, and Nagle's algorithm by tens of milliseconds (the first event
    # follows the response head in a separate small write).
    assert arrivals[0].arrived - requested < 0.05
    assert statistics.median(latencies) < 0.01, latencies
    assert max(latencies) < 0.05, latencies
    # The gaps the client sees are the upstream's gaps.
    for before, after in itertools.pairwise(arrivals):
        assert abs((after.arrived - before.arrived) - (after.sent - before.sent)) < 0.05


@dataclass
class ScriptedUpstream:
    """A raw HTTP/1.1 upstream: reads one request head, then runs ``script`` on the socket.

    Records what a real origin would notice: how much it managed to send, and when it saw
    the proxy close the connection.
    """

    script: Callable[[ScriptedUpstream, trio.SocketStream], Awaitable[None]]
    sent: int = 0
    received: int = 0
    connections: int = 0
    closed_at: list[float] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                head += chunk
            try:
                await self.script(self, stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed_at.append(trio.current_time())

    async def send(self, stream: trio.SocketStream, data: bytes) -> None:
        await stream.send_all(data)
        self.sent += len(data)

    async def wait_for_close(self, stream: trio.SocketStream) -> None:
        """Read until the peer closes (a silent origin still notices a FIN or RST)."""
        while await stream.receive_some(65536):
            pass
        self.closed_at.append(trio.current_time())


async def start(nursery: trio.Nursery, upstream: ScriptedUpstream, **config: object):  # type: ignore[no-untyped-def]
    port = await nursery.start(upstream.serve)
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port, **config), observers=(records.append,))
    return proxy, records


# -- SSE timing --------------------------------------------------------------------------------


async def test_sse_events_arrive_as_the_upstream_sends_them_h1(nursery, demo_upstream):
    _, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port), observers=(records.append,))
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            requested = time.time()
            await client.send(sse_request("/events?interval=0.1&count=10"), h11.EndOfMessage())
            response, arrivals = await read_sse(client, 10)
    headers = dict(response.headers)
    assert headers[b"content-type"] == b"text/event-stream"
    assert b"content-encoding" not in headers and b"content-length" not in headers
    assert_prompt(arrivals, requested, 10)


async def test_sse_events_arrive_as_the_upstream_sends_them_h2(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        async with await H2Client.connect(proxy.port) as client:
            requested = time.time()
            stream_id = await client.start(
                "GET",
                "/events?interval=0.1&count=10",
                headers=[("accept", "text/event-stream"), ("accept-encoding", "gzip")],
            )
            arrivals = await read_sse_h2(client, stream_id, 10)
    reply = client.replies[stream_id]
    assert reply.status == 200 and reply.header(b"content-type") == b"text/event-stream"
    assert reply.header(b"content-encoding") is None
    assert_prompt(arrivals, requested, 10)


async def test_sse_outlives_read_timeout_while_the_upstream_talks(
    nursery, demo_upstream, autojump_clock
):
    # On the mock clock: with real time, a pause of the process longer than the gap between
    # an event and the read timeout's deadline lets both expire at once, and the proxy cuts.
    _, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(
        nursery, make_config(port, read_timeout=0.3), observers=(records.append,)
    )
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(sse_request("/events?interval=0.1&count=12"), h11.EndOfMessage())
            _, arrivals = await read_sse(client, 12)
            assert isinstance(await client.next_event(), h11.EndOfMessage)
            await wait_until(lambda: bool(records))
    assert [a.n for a in arrivals] == list(range(1, 13))
    # The access log gets the stream when it ends, with its whole length: 11 gaps of 0.1 s,
    # more than three read timeouts.
    [record] = records
    assert record.status == 200 and record.event_stream and not record.error
    assert record.duration > 1.0


async def test_sse_comments_keep_a_quiet_stream_alive(nursery):
    async def heartbeat(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await upstream.send(stream, SSE_HEAD)
        for _ in range(8):  # 0.8 s of comments only, read_timeout is 0.25 s
            await upstream.send(stream, chunk(b": keep-alive\n\n"))
            await trio.sleep(0.1)
        await upstream.send(stream, chunk(b"data: finally\n\n") + b"0\r\n\r\n")

    proxy, _records = await start(nursery, ScriptedUpstream(heartbeat), read_timeout=0.25)
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/")
    assert reply.status == 200
    assert reply.body == b": keep-alive\n\n" * 8 + b"data: finally\n\n"


async def test_sse_silent_past_read_timeout_is_cut(nursery):
    async def silent(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await upstream.send(stream, SSE_HEAD + chunk(b"data: one\n\n"))
        await upstream.wait_for_close(stream)

    upstream = ScriptedUpstream(silent)
    proxy, records = await start(nursery, upstream, read_timeout=0.25)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(sse_request("/"), h11.EndOfMessage())
            assert isinstance(await client.next_event(), h11.Response)
            assert (await client.next_event()).data == b"data: one\n\n"
            started = trio.current_time()
            with pytest.raises(h11.RemoteProtocolError):  # closed mid-body: incomplete
                await client.next_event()
            assert 0.2 < trio.current_time() - started < 1.0
            await wait_until(lambda: bool(upstream.closed_at and records))
    assert records[0].error == "http_response_timeout"


# -- client disconnects ------------------------------------------------------------------------


async def test_client_disconnect_mid_sse_closes_the_upstream_connection_at_once(nursery):
    # A long-poll style stream: one event, then nothing for a long time. The proxy has
    # nothing to write, so only watching the client's socket can notice that it left.
    async def one_event(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await upstream.send(stream, SSE_HEAD + chunk(b"data: hello\n\n"))
        await upstream.wait_for_close(stream)

    upstream = ScriptedUpstream(one_event)
    proxy, records = await start(nursery, upstream)
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        await client.send(sse_request("/"), h11.EndOfMessage())
        assert isinstance(await client.next_event(), h11.Response)
        assert (await client.next_event()).data == b"data: hello\n\n"
        await client.aclose()
        left = trio.current_time()
        await wait_until(lambda: bool(upstream.closed_at))
        assert upstream.closed_at[0] - left < 0.2
        await wait_until(lambda: bool(records))
    assert records[0].error == "client_disconnected"
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.idle == 0 and stats.closed == {"error": 1}


async def test_h2_reset_or_disconnect_mid_sse_closes_the_upstream_connection_at_once(nursery):
    async def one_event(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await upstream.send(stream, SSE_HEAD + chunk(b"data: hello\n\n"))
        await upstream.wait_for_close(stream)

    upstream = ScriptedUpstream(one_event)
    proxy, records = await start(nursery, upstream)
    with trio.fail_after(5):
        client = await H2Client.connect(proxy.port)
        async with client:
            first = await client.start("GET", "/first")
            second = await client.start("GET", "/second")
            await client.until(lambda: client.replies[first].body and client.replies[second].body)
            # RST_STREAM: that stream's upstream connection is closed, the other goes on.
            client.conn.reset_stream(first)
            await client.flush()
            left = trio.current_time()
            await wait_until(lambda: len(upstream.closed_at) == 1)
            assert upstream.closed_at[0] - left < 0.2
        # Closing the TCP connection: the remaining stream's upstream connection is closed.
        left = trio.current_time()
        await wait_until(lambda: len(upstream.closed_at) == 2)
        assert upstream.closed_at[1] - left < 0.2
        await wait_until(lambda: len(records) == 2)
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.idle == 0 and stats.closed == {"error": 2}


async def test_client_disconnect_mid_sse_demo_upstream_sees_it(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        await client.send(sse_request("/events?interval=0.05"), h11.EndOfMessage())
        await read_sse(client, 3)
        assert upstream.stats.connections_open == 1
        await client.aclose()
        await wait_until(lambda: upstream.stats.connections_open == 0)
        # The next request cannot get that connection back from the pool: it was closed.
        async with await H11Client.connect(proxy.port) as again:
            assert (await again.request("GET", "/status/204")).status == 204
    assert upstream.stats.connections_opened == 2
    assert proxy.pool().statistics().closed == {"error": 1}


async def test_client_waiting_for_a_slow_response_that_leaves_cancels_it(nursery, demo_upstream):
    upstream, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port), observers=(records.append,))
    with trio.fail_after(5):
        client = await H11Client.connect(proxy.port)
        await client.send(
            h11.Request(method="GET", target="/slow?delay=3", headers=[("host", "a")])
        )
        await client.send(h11.EndOfMessage())
        await wait_until(lambda: upstream.stats.connections_open == 1)
        await client.aclose()
        left = trio.current_time()
        await wait_until(lambda: bool(records))
        assert trio.current_time() - left < 0.5  # not when the upstream answers, 3 s later
    assert records[0].error == "client_disconnected"
    assert proxy.pool().statistics().closed == {"error": 1}


async def test_closing_right_after_a_complete_response_is_not_a_disconnect(nursery, demo_upstream):
    # A Content-Length body is complete on the wire before the proxy has finished the
    # exchange: a client that reads it and closes at once did not leave mid-response.
    _upstream, port = demo_upstream
    records: list[ExchangeRecord] = []
    proxy = await start_proxy(nursery, make_config(port), observers=(records.append,))
    with trio.fail_after(10):
        for target in ["/status/200", "/status/204", "/echo"] * 40:
            async with await H11Client.connect(proxy.port) as client:
                assert (await client.request("GET", target)).status in (200, 204)
        await wait_until(lambda: len(records) == 120)
    assert [r.error for r in records] == [""] * 120
    assert proxy.pool().statistics().closed == {}  # every upstream connection went back


async def test_pipelined_requests_are_not_mistaken_for_a_disconnect(nursery, demo_upstream):
    # While a response streams, the proxy watches the client's socket; bytes that arrive
    # there are the next request, which must be kept, not dropped.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(sse_request("/events?interval=0.05&count=4"), h11.EndOfMessage())
            await client.next_event()  # the response head: the stream is under way
            await client.stream.send_all(b"GET /status/201 HTTP/1.1\r\nHost: a\r\n\r\n")
            while not isinstance(await client.next_event(), h11.EndOfMessage):
                pass
            client.conn.start_next_cycle()
            reply = await client.read_reply()
    assert reply.status == 201


# -- backpressure and limits -------------------------------------------------------------------


async def test_slow_client_slows_the_upstream_down(nursery):
    async def endless(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await upstream.send(stream, b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n")
        block = b"x" * 65536
        while True:
            await upstream.send(stream, block)

    upstream = ScriptedUpstream(endless)
    proxy, _ = await start(nursery, upstream)
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
            await client.send(h11.EndOfMessage())
            assert isinstance(await client.next_event(), h11.Response)
            # The client stops reading: socket buffers fill, then the upstream is stuck.
            await trio.sleep(0.5)
            stuck_at = upstream.sent
            await trio.sleep(0.5)
            assert upstream.sent == stuck_at
            assert stuck_at < 64 * 1024 * 1024  # kernel buffers, not the proxy's memory
            # Reading again lets it go on.
            received = 0
            while received < 2 * stuck_at:
                received += len((await client.next_event()).data)
            assert upstream.sent > stuck_at


async def test_slow_upstream_slows_the_uploading_client_down(nursery):
    async def no_reader(upstream: ScriptedUpstream, stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    proxy, _ = await start(nursery, ScriptedUpstream(no_reader))
    sent = 0
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(
                    method="POST",
                    target="/",
                    headers=[("host", "a"), ("transfer-encoding", "chunked")],
                )
            )

            async def upload() -> None:
                nonlocal sent
                block = b"x" * 65536
                while True:
                    await client.send(h11.Data(data=block))
                    sent += len(block)

            async with trio.open_nursery() as uploader:
                uploader.start_soon(upload)
                await trio.sleep(0.5)
                stuck_at = sent
                await trio.sleep(0.5)
                assert sent == stuck_at
                assert stuck_at < 64 * 1024 * 1024
                uploader.cancel_scope.cancel()


async def test_chunked_body_over_max_body_bytes_is_413_as_soon_as_it_crosses(
    nursery, demo_upstream
):
    # /slow answers only after 5 s, without reading the body: the 413 comes from the proxy,
    # when the limit is crossed, not when the upstream gets round to answering.
    # The limit is small enough for the socket buffers on the way to hold it: with a larger
    # one, backpressure from the non-reading upstream stops the client before it gets there.
    _, port = demo_upstream
    limit = 100_000
    proxy = await start_proxy(nursery, make_config(port, server={"max_body_bytes": limit}))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(
                    method="POST",
                    target="/slow?delay=5",
                    headers=[("host", "a"), ("transfer-encoding", "chunked")],
                )
            )
            started = trio.current_time()
            sent = 0
            async with trio.open_nursery() as uploader:

                async def upload() -> None:
                    nonlocal sent
                    while sent <= limit:
                        await client.send(h11.Data(data=b"x" * 16384))
                        sent += 16384

                uploader.start_soon(upload)
                reply = await client.read_reply()
    assert reply.status == 413
    assert b"error=http_request_error" in reply.headers[b"proxy-status"]
    assert trio.current_time() - started < 2.0
    assert sent > limit


async def test_content_length_over_max_body_bytes_is_413_before_the_body(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_body_bytes": 1000}))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(
                    method="POST",
                    target="/echo",
                    headers=[("host", "a"), ("content-length", "1001")],
                )
            )
            reply = await client.read_reply()  # no body byte was sent
    assert reply.status == 413
    assert upstream.stats.requests == 0


async def test_expect_100_continue_lets_the_upstream_refuse_the_body(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(
                    method="PUT",
                    target="/status/417",
                    headers=[
                        ("host", "a"),
                        ("content-length", "100000000"),
                        ("expect", "100-continue"),
                    ],
                )
            )
            reply = await client.read_reply()  # the final answer, without a 100 or a body
    assert reply.status == 417


# -- memory ------------------------------------------------------------------------------------


STREAM_SIZE = 256 * MIB


async def test_256_mib_up_and_down_keep_memory_flat(nursery, demo_upstream):
    # The proxy, the demo upstream and the client all run in this process, so the growth of
    # its peak RSS bounds what the proxy kept: a proxy that buffered a body would add 256 MiB.
    # (bench/stream_memory.py measures the proxy alone, as a separate process, on 1 GiB.)
    if not reset_peak_rss():
        pytest.skip("cannot reset VmHWM via /proc/self/clear_refs")
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    baseline = status_kib("VmRSS")
    block = bytes(range(256)) * 256  # 64 KiB
    with trio.fail_after(120):
        async with await H11Client.connect(proxy.port) as client:
            # Download.
            await client.send(
                h11.Request(method="GET", target=f"/bytes/{STREAM_SIZE}", headers=[("host", "a")])
            )
            await client.send(h11.EndOfMessage())
            assert isinstance(await client.next_event(), h11.Response)
            received = 0
            while isinstance(event := await client.next_event(), h11.Data):
                received += len(event.data)
            assert received == STREAM_SIZE
            client.conn.start_next_cycle()
            # Upload, echoed back while it is still being sent.
            await client.send(
                h11.Request(
                    method="POST",
                    target="/echo",
                    headers=[("host", "a"), ("content-length", str(STREAM_SIZE))],
                )
            )
            echoed = 0

            async def upload() -> None:
                for _ in range(STREAM_SIZE // len(block)):
                    await client.send(h11.Data(data=block))
                await client.send(h11.EndOfMessage())

            async with trio.open_nursery() as uploader:
                uploader.start_soon(upload)
                assert isinstance(await client.next_event(), h11.Response)
                while isinstance(event := await client.next_event(), h11.Data):
                    echoed += len(event.data)
            assert echoed == STREAM_SIZE
    growth_mib = (status_kib("VmHWM") - baseline) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.1f} MiB"
