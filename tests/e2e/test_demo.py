"""End-to-end tests of the demo upstream over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import h11
import httpx
import trio

from pooled_proxy.daemon.demo_upstream import DemoUpstream


@asynccontextmanager
async def running(upstream: DemoUpstream) -> AsyncIterator[int]:
    """Serve `upstream` on an ephemeral port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(upstream.serve)
        yield port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
        yield c


async def wait_for(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


class RawClient:
    """A hand-driven h11 client, for what httpx can't show (100-continue, timing, garbage)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            await self.stream.send_all(self.conn.send(event) or b"")

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            assert isinstance(event, h11.Event)
            return event


async def test_keepalive_reuses_one_connection() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream()
        async with running(upstream) as port, client(port) as c:
            for i in range(10):
                r = await c.get(f"/status/200?i={i}")
                assert r.status_code == 200
        assert upstream.stats.connections_opened == 1
        assert upstream.stats.requests == 10
        assert upstream.stats.max_concurrent_connections == 1


async def test_echo_streams_body_back() -> None:
    chunks = [bytes([i]) * 10_000 for i in range(20)]

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    with trio.fail_after(10):
        async with running(DemoUpstream()) as port, client(port) as c:
            r = await c.post("/echo?a=b", content=body(), headers={"content-type": "text/x-t"})
            assert r.status_code == 200
            assert r.content == b"".join(chunks)
            assert r.headers["content-type"] == "text/x-t"
            assert r.headers["x-echo-method"] == "POST"
            assert r.headers["x-echo-path"] == "/echo?a=b"
            assert r.headers["transfer-encoding"] == "chunked"
            r = await c.put("/echo", content=b"xyz")
            assert r.content == b"xyz"
            assert r.headers["content-type"] == "application/octet-stream"


async def test_echo_answers_each_chunk_before_the_body_ends() -> None:
    with trio.fail_after(10):
        async with running(DemoUpstream()) as port:
            raw = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
            headers = [("host", "x"), ("transfer-encoding", "chunked"), ("expect", "100-continue")]
            await raw.send(h11.Request(method="POST", target="/echo", headers=headers))
            informational = await raw.next_event()  # sent only once the server reads the body
            assert isinstance(informational, h11.InformationalResponse)
            assert informational.status_code == 100
            await raw.send(h11.Data(data=b"first"))
            response = await raw.next_event()
            assert isinstance(response, h11.Response) and response.status_code == 200
            first = await raw.next_event()
            assert isinstance(first, h11.Data) and first.data == b"first"
            await raw.send(h11.Data(data=b"second"), h11.EndOfMessage())
            second = await raw.next_event()
            assert isinstance(second, h11.Data) and second.data == b"second"
            assert isinstance(await raw.next_event(), h11.EndOfMessage)
            await raw.stream.aclose()


async def test_echo_json_shows_received_headers() -> None:
    with trio.fail_after(10):
        async with running(DemoUpstream()) as port, client(port) as c:
            r = await c.get("/echo?q=1", headers={"X-Forwarded-For": "10.0.0.1", "Via": "1.1 p"})
            assert r.headers["content-type"] == "application/json"
            info = r.json()
            assert info["method"] == "GET"
            assert info["path"] == "/echo?q=1"
            assert ["x-forwarded-for", "10.0.0.1"] in info["headers"]
            assert ["via", "1.1 p"] in info["headers"]
            assert ["host", f"127.0.0.1:{port}"] in info["headers"]
            head = await c.head("/echo")
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["content-length"]) > 0


async def test_events_yields_well_formed_events() -> None:
    with trio.fail_after(10):
        async with (
            running(DemoUpstream()) as port,
            client(port) as c,
            c.stream("GET", "/events?count=3&interval=0.05") as r,
        ):
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["transfer-encoding"] == "chunked"
            text = (await r.aread()).decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert len(events) == 3
    for n, event in enumerate(events, start=1):
        id_line, data_line = event.split("\n")
        assert id_line == f"id: {n}"
        assert data_line.startswith("data: ")
        payload = json.loads(data_line.removeprefix("data: "))
        assert payload["n"] == n and isinstance(payload["t"], float)


async def test_events_client_disconnect_is_quiet() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream(event_interval=0.01)
        async with running(upstream) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            received = b""
            while b"data: " not in received:
                received += await stream.receive_some(65536)
            await stream.aclose()  # vanish mid-stream
            # The nursery would re-raise any error escaping the connection handler.
            await wait_for(lambda: upstream.stats.connections_open == 0)


async def test_bytes_length_and_content() -> None:
    with trio.fail_after(10):
        async with running(DemoUpstream()) as port, client(port) as c:
            r = await c.get("/bytes/1000000")
            assert r.status_code == 200
            assert r.headers["content-length"] == "1000000"
            assert len(r.content) == 1000000
            assert r.content[:256] == bytes(range(256)) and r.content[-1] == 999999 % 256
            head = await c.head("/bytes/1073741824")
            assert head.headers["content-length"] == "1073741824" and head.content == b""


async def test_status_slow_and_not_found() -> None:
    with trio.fail_after(10):
        async with running(DemoUpstream()) as port, client(port) as c:
            r = await c.get("/status/503")
            assert r.status_code == 503 and r.text == "503 Service Unavailable\n"
            assert (await c.get("/status/204")).content == b""
            assert (await c.get("/status/99")).status_code == 400
            assert (await c.get("/nope")).status_code == 404
            assert (await c.get("/slow?delay=0.05")).text == "slow done\n"
            assert (await c.get("/slow?delay=-1")).status_code == 400
            home = await c.get("/")
            assert home.headers["content-type"].startswith("text/html")
            assert 'new EventSource("/events")' in home.text


async def test_body_sent_to_non_echo_endpoint_is_drained_and_connection_reused() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream()
        async with running(upstream) as port, client(port) as c:
            for _ in range(3):
                r = await c.post("/status/201", content=b"x" * 100_000)
                assert r.status_code == 201
        assert upstream.stats.connections_opened == 1


async def test_protocol_error_gets_400_and_close() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream()
        async with running(upstream) as port:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"this is not http\r\n\r\n")
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            assert received.startswith(b"HTTP/1.1 400 ")
            assert b"connection: close" in received.lower()
            await stream.aclose()
            await wait_for(lambda: upstream.stats.connections_open == 0)


async def test_keepalive_timeout_closes_idle_connection() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream(keepalive_timeout=0.2)
        async with running(upstream) as port:
            raw = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
            await raw.send(
                h11.Request(method="GET", target="/status/200", headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            response = await raw.next_event()
            assert isinstance(response, h11.Response)
            assert (b"keep-alive", b"timeout=0") in response.headers
            while not isinstance(await raw.next_event(), h11.EndOfMessage):
                pass
            start = trio.current_time()
            assert await raw.stream.receive_some(65536) == b""  # server closed while idle
            assert 0.15 < trio.current_time() - start < 2
            await raw.stream.aclose()
            await wait_for(lambda: upstream.stats.connections_open == 0)
        assert upstream.stats.connections_opened == 1


async def test_keepalive_header_advertises_whole_seconds() -> None:
    with trio.fail_after(10):
        async with running(DemoUpstream(keepalive_timeout=5)) as port, client(port) as c:
            assert (await c.get("/status/200")).headers["keep-alive"] == "timeout=5"
        async with running(DemoUpstream()) as port, client(port) as c:
            assert "keep-alive" not in (await c.get("/status/200")).headers


async def test_counts_concurrent_connections() -> None:
    with trio.fail_after(10):
        upstream = DemoUpstream()
        async with running(upstream) as port:
            streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await wait_for(lambda: upstream.stats.connections_open == 3)
            for stream in streams:
                await stream.aclose()
            await wait_for(lambda: upstream.stats.connections_open == 0)
        assert upstream.stats.connections_opened == 3
        assert upstream.stats.max_concurrent_connections == 3
