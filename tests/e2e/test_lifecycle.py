"""Drain: in-process on MockClock over memory streams (ordering, deadlines, counts), then the
real daemon as a subprocess under load with SIGTERM (real sockets, real time)."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import h11
import pytest
import trio
import trio.testing

from pooled_proxy.config import ServerAddress
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.proxy import FIRST_REQUEST_GRACE, Proxy
from pooled_proxy.server.listen import handle_client
from pooled_proxy.upstream.connection import UpstreamConnection
from tests.support.daemon import DaemonConfig, running_daemon
from tests.support.h2client import GoAway, H2Client, H2Reply
from tests.support.helpers import H11Client, connection_storm, make_config, start_proxy
from tests.support.scripted_upstream import OK, ScriptedUpstream

# -- in-process, MockClock -------------------------------------------------------------------


class MemoryListen:
    """Stands in for the TCP listeners: each ``connect()`` is a memory-stream connection
    served by the real ``handle_client`` in the lifecycle's handler nursery; like a closed
    listener, it refuses once the drain has started."""

    def __init__(self) -> None:
        self.proxy: Proxy | None = None
        self.handlers: trio.Nursery | None = None
        self.closed = False

    async def __call__(
        self,
        proxy: Proxy,
        handler_nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.proxy, self.handlers = proxy, handler_nursery
        task_status.started([ServerAddress("memory", 0)])
        await proxy.drain_started.wait()
        self.closed = True

    def connect(self) -> H11Client:
        if self.closed:
            raise ConnectionRefusedError("listener closed")
        assert self.handlers is not None and self.proxy is not None
        client, server = trio.testing.memory_stream_pair()
        self.handlers.start_soon(
            partial(handle_client, server, self.proxy, scheme=b"http", h2_handler=None)
        )
        return H11Client(client)  # type: ignore[arg-type]


Connector = Callable[[ServerAddress], Awaitable[UpstreamConnection]]


def get(target: str, *headers: tuple[str, str], method: str = "GET") -> h11.Request:
    return h11.Request(method=method, target=target, headers=[("host", "a"), *headers])


def demo_connector(nursery: trio.Nursery, demo: DemoUpstream) -> Connector:
    """Upstream connections over memory streams to the demo upstream's connection handler."""

    async def connect(server: ServerAddress) -> UpstreamConnection:
        near, far = trio.testing.memory_stream_pair()
        nursery.start_soon(demo._handle, far)
        return UpstreamConnection(near, server)

    return connect


@dataclass
class Served:
    proxy: Proxy
    listen: MemoryListen
    done: trio.Event
    done_at: list[float]


async def start_in_memory(
    nursery: trio.Nursery, upstream: dict[str, object] | None = None, **server: object
) -> Served:
    demo = DemoUpstream(event_interval=1.0)
    proxy = Proxy(
        make_config(9, server=server, **(upstream or {})), connect=demo_connector(nursery, demo)
    )
    listen = MemoryListen()
    done, done_at = trio.Event(), []

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(proxy, listen=listen, task_status=task_status)
        done_at.append(trio.current_time())
        done.set()

    await nursery.start(run)
    return Served(proxy, listen, done, done_at)


async def wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.001)


async def read_until_closed(client: H11Client) -> bytes:
    data = b""
    while chunk := await client.stream.receive_some(65536):
        data += chunk
    return data


async def test_drain_waits_for_in_flight_work_and_closes_idle_at_once(
    autojump_clock, nursery, caplog
):
    with trio.fail_after(60):  # virtual seconds: a hang fails instead of blocking
        caplog.set_level(logging.INFO, logger="pooled_proxy")
        served = await start_in_memory(nursery, drain_timeout=10.0)
        proxy, listen = served.proxy, served.listen

        idle = listen.connect()
        assert (await idle.request("GET", "/echo")).status == 200

        slow = listen.connect()
        await slow.send(get("/slow?delay=3"), h11.EndOfMessage())
        sse = listen.connect()
        await sse.send(get("/events?count=5"), h11.EndOfMessage())
        assert (await sse.next_event()).status_code == 200
        assert b"id: 1" in (await sse.next_event()).data
        upload = listen.connect()
        await upload.send(
            get("/echo", ("content-length", "10"), method="POST"),
            h11.Data(data=b"hello"),
        )
        await wait_for(lambda: proxy.active_exchanges == 3)

        t0 = trio.current_time()
        proxy.begin_drain()
        # New connections are refused; the idle keep-alive connection is closed at once.
        await wait_for(lambda: listen.closed)
        with pytest.raises(ConnectionRefusedError):
            listen.connect()
        assert await read_until_closed(idle) == b""
        assert trio.current_time() - t0 < 0.01

        # The upload finishes (the echo's head went out before the drain), then its connection
        # closes; the slow response's head goes out during the drain and says so.
        await upload.send(h11.Data(data=b"world"), h11.EndOfMessage())
        reply = await upload.read_reply()
        assert (reply.status, reply.body) == (200, b"helloworld")
        assert await read_until_closed(upload) == b""
        reply = await slow.read_reply()
        assert reply.status == 200 and reply.headers[b"connection"] == b"close"
        assert trio.current_time() - t0 == pytest.approx(3, abs=0.1)

        # The SSE stream gets every event, then its connection closes.
        events = []
        while not isinstance(event := await sse.next_event(), h11.EndOfMessage):
            events.append(event.data)
        assert [b"id: %d" % n in data for n, data in zip(range(2, 6), events)] == [True] * 4
        assert await read_until_closed(sse) == b""

        await served.done.wait()
        # serve returned as soon as the last exchange ended (the SSE stream, 4 s), not at 10 s.
        assert served.done_at[0] - t0 == pytest.approx(4, abs=0.1)
        stats = proxy.forwarder.upstreams["app"].pools[0].statistics()
        assert stats.idle == 0 and stats.in_use == 0
        assert stats.closed.get("drain", 0) >= 1
        messages = [r.getMessage() for r in caplog.records if r.name == "pooled_proxy.lifecycle"]
        assert any(m.startswith("drain started: 3 exchange(s) in flight") for m in messages)
        assert any(
            m.startswith("drain complete after 4.0")
            and "waited for 3 exchange(s), all finished" in m
            for m in messages
        ), messages


async def test_drain_deadline_cuts_what_is_left_and_says_so(autojump_clock, nursery, caplog):
    with trio.fail_after(60):  # virtual seconds: a hang fails instead of blocking
        caplog.set_level(logging.INFO, logger="pooled_proxy")
        served = await start_in_memory(nursery, drain_timeout=2.0)
        proxy, listen = served.proxy, served.listen
        hanging, quick = listen.connect(), listen.connect()
        await hanging.send(get("/slow?delay=100"), h11.EndOfMessage())
        await quick.send(get("/slow?delay=1"), h11.EndOfMessage())
        await wait_for(lambda: proxy.active_exchanges == 2)

        t0 = trio.current_time()
        proxy.begin_drain()
        assert (await quick.read_reply()).status == 200
        # The hanging one gets no response: its connection closes at the deadline.
        assert await read_until_closed(hanging) == b""
        assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.01)
        await served.done.wait()
        assert served.done_at[0] - t0 == pytest.approx(2.0, abs=0.01)
        messages = [r.getMessage() for r in caplog.records if r.name == "pooled_proxy.lifecycle"]
        assert any(
            m.startswith("drain deadline passed after 2.0")
            and "waited for 2 exchange(s), 1 finished, 1 cut" in m
            for m in messages
        ), messages


async def test_new_connection_gets_a_short_grace_for_its_first_request(autojump_clock, nursery):
    with trio.fail_after(60):  # virtual seconds: a hang fails instead of blocking
        served = await start_in_memory(nursery, drain_timeout=30.0)
        proxy, listen = served.proxy, served.listen
        late, silent = listen.connect(), listen.connect()
        await wait_for(lambda: proxy.client_connections == 2)

        t0 = trio.current_time()
        proxy.begin_drain()
        await trio.sleep(FIRST_REQUEST_GRACE / 2)
        # A request that arrives within the grace is served, and the connection then closes.
        reply = await late.request("GET", "/echo")
        assert reply.status == 200 and reply.headers[b"connection"] == b"close"
        assert await read_until_closed(late) == b""
        # One that never sends a byte is idle: closed when the grace is over.
        assert await read_until_closed(silent) == b""
        assert trio.current_time() - t0 == pytest.approx(FIRST_REQUEST_GRACE, abs=0.01)
        await served.done.wait()
        assert served.done_at[0] - t0 == pytest.approx(FIRST_REQUEST_GRACE, abs=0.01)


async def test_requests_queued_for_a_connection_are_served_or_answered_within_the_drain(
    autojump_clock, nursery, caplog
):
    """Queued requests are in flight: each is served as a connection comes free, and one
    still queued near the deadline gets a 503 (it never reached an upstream) instead of being
    cut without an answer."""
    with trio.fail_after(60):  # virtual seconds: a hang fails instead of blocking
        caplog.set_level(logging.INFO, logger="pooled_proxy")
        one_connection = {"max_connections": 1, "queue_timeout": 60.0}
        served = await start_in_memory(nursery, upstream=one_connection, drain_timeout=3.5)
        proxy, listen = served.proxy, served.listen
        clients = [listen.connect() for _ in range(5)]
        for client in clients:
            await client.send(get("/slow?delay=1"), h11.EndOfMessage())
            await trio.sleep(0.01)  # queued in this order
        await wait_for(lambda: proxy.active_exchanges == 5)
        assert proxy.forwarder.upstreams["app"].pools[0].statistics().waiting == 4

        t0 = trio.current_time()
        proxy.begin_drain()
        answers: list[tuple[int, float]] = []
        replies = []

        async def read(client: H11Client) -> None:
            try:
                reply = await client.read_reply()
            except h11.RemoteProtocolError:  # closed without a response
                answers.append((0, trio.current_time() - t0))
                return
            answers.append((reply.status, trio.current_time() - t0))
            replies.append(reply)

        async with trio.open_nursery() as readers:
            for client in clients:
                readers.start_soon(read, client)
        # One after another on the one connection (1 s each) while the drain lasts (3.5 s):
        # the fourth is cut at the deadline mid-response; the fifth, still queued, is
        # answered 503 just before it, with Retry-After.
        assert [status for status, _ in answers] == [200, 200, 200, 503, 0]
        done_at = [at for _, at in answers]
        assert [done_at[1] - done_at[0], done_at[2] - done_at[1]] == pytest.approx([1.0, 1.0])
        assert done_at[3:] == pytest.approx([3.4, 3.5])
        assert all(reply.headers[b"connection"] == b"close" for reply in replies)
        refusal = replies[-1]
        assert refusal.headers[b"retry-after"] == b"1"
        assert b"error=proxy_internal_error" in refusal.headers[b"proxy-status"]
        await served.done.wait()
    messages = [r.getMessage() for r in caplog.records if r.name == "pooled_proxy.lifecycle"]
    assert any("waited for 5 exchange(s), 4 finished, 1 cut" in m for m in messages), messages


# -- in-process, real sockets -------------------------------------------------------------------


async def flow_limited_download(port: int, size: int, halfway: trio.Event) -> H2Reply:
    """An HTTP/2 client held back by flow control: a 64 KiB window, a small socket buffer,
    and each read credited back (in small WINDOW_UPDATEs) only after a pause, as a slow
    reader does. Sets ``halfway`` a third of the way through; reads until the stream ends or
    the connection does."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    await sock.connect(("127.0.0.1", port))
    async with H2Client(trio.SocketStream(sock), auto_ack=False) as client:
        client.conn.initiate_connection()
        await client.flush()
        stream_id = await client.start("GET", f"/bytes/{size}")
        reply = client.replies[stream_id]
        while not (reply.ended or reply.reset_code is not None):
            before = len(reply.body)
            try:
                data = await client.stream.receive_some(4096)
            except trio.BrokenResourceError:
                break  # reset: the tail of the response is lost
            if not data:
                break
            for event in client.conn.receive_data(client._without_goaway(data)):
                client._apply(event)
            if len(reply.body) > size // 3:
                halfway.set()
            if len(reply.body) > before:
                await trio.sleep(0.001)
                client.conn.acknowledge_received_data(len(reply.body) - before, stream_id)
                with contextlib.suppress(trio.BrokenResourceError):
                    await client.flush()
        return reply


async def test_h2_download_held_by_flow_control_completes_through_a_drain(
    nursery, demo_upstream, caplog
):
    caplog.set_level(logging.INFO, logger="pooled_proxy")
    _, port = demo_upstream
    running = await start_proxy(nursery, make_config(port, server={"drain_timeout": 10.0}))
    size = 1_000_000
    with trio.fail_after(10):
        halfway = trio.Event()
        replies: list[H2Reply] = []

        async def download() -> None:
            replies.append(await flow_limited_download(running.port, size, halfway))

        async with trio.open_nursery() as clients:
            for _ in range(3):
                clients.start_soon(download)
            await halfway.wait()
            running.proxy.begin_drain()
        while "drain complete" not in caplog.text:
            await trio.sleep(0.01)
    expected = (bytes(range(256)) * (size // 256 + 1))[:size]
    # Byte for byte, END_STREAM included: the drain's close did not reset the tail away.
    assert [(len(r.body), r.ended) for r in replies] == [(size, True)] * 3
    assert all(r.body == expected for r in replies)
    assert "waited for 3 exchange(s), all finished" in caplog.text


async def wait_for_line(caplog: pytest.LogCaptureFixture, text: str) -> None:
    while text not in caplog.text:
        await trio.sleep(0.005)


async def test_listener_closes_at_drain_start_while_clients_keep_connecting(nursery, caplog):
    caplog.set_level(logging.INFO, logger="pooled_proxy")
    # The upstream answers only when the test lets it: the exchange is in flight through
    # the whole drain start, however long a busy machine takes over it.
    answer = trio.Event()
    upstream = ScriptedUpstream({"/slow": [answer, OK]})
    port = await nursery.start(upstream.serve)
    running = await start_proxy(nursery, make_config(port, server={"drain_timeout": 10.0}))
    proxy = running.proxy
    with trio.fail_after(10):
        async with await H11Client.connect(running.port) as busy:
            await busy.send(get("/slow"), h11.EndOfMessage())
            await wait_for(lambda: proxy.active_exchanges == 1)
            async with connection_storm(running.port) as storm:
                await storm.started()
                proxy.begin_drain()
                with trio.fail_after(1):
                    await wait_for_line(caplog, "stopped listening on 127.0.0.1:")
                # The exchange in flight still runs, but nobody new gets in: the storm
                # ended on a refusal, and so does a client connecting now.
                assert proxy.active_exchanges == 1
                assert await storm.outcome() == "refused"
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", running.port)
                answer.set()
                reply = await busy.read_reply()
                assert reply.status == 200 and reply.headers[b"connection"] == b"close"


# -- the real daemon, SIGTERM ----------------------------------------------------------------


async def sse_events(port: int, count: int, interval: float, got_first: trio.Event) -> list[bytes]:
    """The data lines of a whole SSE stream; raises if it ends incomplete."""
    async with await H11Client.connect(port) as client:
        await client.send(
            h11.Request(method="GET", target=f"/events?count={count}&interval={interval}",
                        headers=[("host", "a"), ("accept", "text/event-stream")]),
            h11.EndOfMessage(),
        )  # fmt: skip
        assert (await client.next_event()).status_code == 200
        body = b""
        while not isinstance(event := await client.next_event(), h11.EndOfMessage):
            body += event.data
            got_first.set()
    return [line for line in body.split(b"\n") if line.startswith(b"id: ")]


async def h2_streams_across_drain(
    port: int, in_flight: trio.Event
) -> tuple[GoAway | None, int, H2Reply, H2Reply]:
    """A slow response and an SSE stream on one h2 connection, in flight when the drain
    starts: (the GOAWAY, the last stream id opened, both replies)."""
    async with await H2Client.connect(port) as client:
        slow = await client.start("GET", "/slow?delay=0.6")
        sse = await client.start("GET", "/events?count=10&interval=0.05")
        await client.until(lambda: client.replies[sse].status == 200)
        in_flight.set()
        await client.until(
            lambda: (
                client.goaway is not None
                and client.replies[slow].ended
                and client.replies[sse].ended
            )
        )
        return client.goaway, sse, client.replies[slow], client.replies[sse]


@dataclass
class Load:
    ok: int = 0
    refused: int = 0
    stop: bool = False


async def load_client(port: int, load: Load, index: int) -> None:
    """New connection per request until refused: a connection that was accepted must get a
    complete 200 (an exception here fails the test)."""
    body = b"x" * (1000 + index)
    while not load.stop:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            load.refused += 1
            return
        async with H11Client(stream) as client:
            if index % 2:
                reply = await client.request("POST", "/echo", [("connection", "close")], body)
                assert (reply.status, reply.body) == (200, body)
            else:
                reply = await client.request("GET", "/slow?delay=0.05", [("connection", "close")])
                assert reply.status == 200
        load.ok += 1


async def slow_upload(port: int, chunks: int, pause: float) -> bytes:
    async with await H11Client.connect(port) as client:
        size = chunks * 4096
        await client.send(get("/echo", ("content-length", str(size)), method="POST"))
        for n in range(chunks):
            await client.send(h11.Data(data=bytes([n]) * 4096))
            await trio.sleep(pause)
        await client.send(h11.EndOfMessage())
        reply = await client.read_reply()
        assert reply.status == 200
        return reply.body


async def test_sigterm_under_load_loses_nothing(nursery, demo_upstream, tmp_path):
    _, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port}, drain_timeout="3s")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(15):
            port = daemon.port
            load = Load()
            results: dict[str, object] = {}
            got_first_event = trio.Event()
            async with trio.open_nursery() as clients:

                async def keep(
                    name: str, fn: Callable[..., Awaitable[object]], *args: object
                ) -> None:
                    results[name] = await fn(*args)

                clients.start_soon(keep, "sse", sse_events, port, 20, 0.05, got_first_event)
                clients.start_soon(keep, "upload", slow_upload, port, 20, 0.05)
                h2_in_flight = trio.Event()
                clients.start_soon(keep, "h2", h2_streams_across_drain, port, h2_in_flight)
                for index in range(8):
                    clients.start_soon(load_client, port, load, index)
                idle = await H11Client.connect(port)
                assert (await idle.request("GET", "/echo")).status == 200
                await got_first_event.wait()
                await h2_in_flight.wait()
                await trio.sleep(0.3)
                ok_before = load.ok

                sigterm_at = trio.current_time()
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for_line("drain started: ")
                # The idle keep-alive connection is closed by the drain, well before the exit.
                assert await idle.stream.receive_some(100) == b""
                await idle.aclose()
            code = await daemon.wait()
            elapsed = trio.current_time() - sigterm_at
    assert code == 0
    assert elapsed < 3.0  # inside drain_timeout: the last exchange (the SSE stream) ended it
    assert results["sse"] == [b"id: %d" % n for n in range(1, 21)]
    assert results["upload"] == b"".join(bytes([n]) * 4096 for n in range(20))
    # HTTP/2: GOAWAY names the last stream opened; both streams in flight complete.
    goaway, last_stream, h2_slow, h2_sse = results["h2"]  # type: ignore[misc]
    assert goaway is not None and (goaway.last_stream_id, goaway.error_code) == (last_stream, 0)
    assert h2_slow.status == 200 and h2_slow.ended
    assert h2_sse.ended and h2_sse.body.count(b"id: ") == 10
    assert ok_before > 8 and load.refused == 8  # every load client ended on a refusal
    assert daemon.has_line("drain complete after") and daemon.has_line("all finished")


async def test_sigterm_cuts_a_hanging_request_at_drain_timeout(nursery, demo_upstream, tmp_path):
    upstream, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port}, drain_timeout="1s")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(10):
            async with await H11Client.connect(daemon.port) as client:
                await client.send(
                    get("/slow?delay=30"),
                    h11.EndOfMessage(),
                )
                await wait_for(lambda: upstream.stats.requests == 1)  # it is in flight
                sigterm_at = trio.current_time()
                daemon.send_signal(signal.SIGTERM)
                with pytest.raises(h11.RemoteProtocolError):  # closed without a response
                    await client.read_reply()
                cut_after = trio.current_time() - sigterm_at
            code = await daemon.wait()
            exit_after = trio.current_time() - sigterm_at
    assert code == 0
    # Cut at drain_timeout (1 s), not when the 30 s request would end; the margin is for a
    # busy machine.
    assert 0.9 < cut_after < 2.0
    assert exit_after < 3.0
    assert daemon.has_line("drain started: 1 exchange(s) in flight")
    assert daemon.has_line("waited for 1 exchange(s), 0 finished, 1 cut")


async def test_second_signal_stops_at_once(nursery, demo_upstream, tmp_path):
    upstream, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port}, drain_timeout="30s")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(10):
            async with await H11Client.connect(daemon.port) as client:
                await client.send(
                    get("/slow?delay=30"),
                    h11.EndOfMessage(),
                )
                await wait_for(lambda: upstream.stats.requests == 1)
                daemon.send_signal(signal.SIGINT)
                await daemon.wait_for_line("drain started: 1 exchange")
                sent_again = trio.current_time()
                daemon.send_signal(signal.SIGTERM)
                code = await daemon.wait()
                stop_took = trio.current_time() - sent_again
    assert code == 0
    assert stop_took < 2.0  # not the 30 s drain_timeout
    assert daemon.has_line("SIGTERM again: stopping now, cutting 1 exchange(s)")
