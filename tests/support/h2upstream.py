"""A hand-driven HTTP/2 upstream (h2 on real sockets, prior knowledge) for tests that need
frame-level control of the server side: stream limits, GOAWAY, resets, windows that never
open. Each request runs ``handler(connection, request)`` in its own task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from tests.support.helpers import HOST


@dataclass
class UpstreamRequest:
    connection: ServerConnection
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    ended: trio.Event = field(default_factory=trio.Event)
    reset_code: int | None = None
    reset: trio.Event = field(default_factory=trio.Event)

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


Handler = Callable[["ServerConnection", UpstreamRequest], Awaitable[None]]


async def answer(connection: ServerConnection, request: UpstreamRequest) -> None:
    """The default handler: 200 with the path as the body, once the request is complete."""
    await request.ended.wait()
    await connection.respond(request.stream_id, body=request.header(b":path") or b"")


class ServerConnection:
    def __init__(self, server: H2Upstream, stream: trio.SocketStream, index: int) -> None:
        self.server = server
        self.stream = stream
        self.index = index
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.requests: dict[int, UpstreamRequest] = {}
        self.closed = trio.Event()
        self._lock = trio.Lock()
        self._window = trio.Event()

    async def flush(self) -> None:
        async with self._lock:
            data = self.h2.data_to_send()
            if data:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def respond(
        self,
        stream_id: int,
        *,
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        trailers: list[tuple[bytes, bytes]] | None = None,
        end: bool = True,
    ) -> None:
        self.h2.send_headers(stream_id, [(b":status", b"%d" % status), *(headers or [])])
        await self.flush()
        await self.send_body(stream_id, body)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        elif end:
            self.h2.end_stream(stream_id)
        await self.flush()

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Sends as the proxy's windows allow: blocks while they are closed."""
        while body:
            size = min(self.h2.local_flow_control_window(stream_id), 16384, len(body))
            if size <= 0:
                self._window = trio.Event()
                await self._window.wait()
                continue
            self.h2.send_data(stream_id, body[:size])
            self.server.data_sent += size
            body = body[size:]
            await self.flush()

    async def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.INTERNAL_ERROR) -> None:
        self.h2.reset_stream(stream_id, code)
        await self.flush()

    async def goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """A GOAWAY written by hand: after h2's own close_connection() it sends nothing more,
        and the streams up to ``last_stream_id`` still have answers to give."""
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        async with self._lock:
            await self.stream.send_all(self.h2.data_to_send() + frame.serialize())

    async def serve(self, nursery: trio.Nursery) -> None:
        server = self.server
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: server.max_streams},
        )
        self.h2.initiate_connection()
        await self.flush()
        try:
            while True:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if not data:
                    break
                server.bytes_received += len(data)
                for event in self.h2.receive_data(data):
                    self._apply(event, nursery)
                await self.flush()
        finally:
            self.closed.set()
            server.open_connections -= 1
            await self.stream.aclose()

    def _apply(self, event: Any, nursery: trio.Nursery) -> None:
        server = self.server
        request = self.requests.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            request = UpstreamRequest(self, event.stream_id, list(event.headers or []))
            self.requests[event.stream_id] = request
            server.requests.append(request)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            if event.stream_ended is not None:
                request.ended.set()
            nursery.start_soon(self._run, request)
        elif isinstance(event, h2.events.DataReceived) and request is not None:
            request.body += event.data or b""
            if server.auto_ack and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, request.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and request is not None:
            request.ended.set()
        elif isinstance(event, h2.events.StreamReset) and request is not None:
            request.reset_code = event.error_code
            request.reset.set()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._window.set()

    async def _run(self, request: UpstreamRequest) -> None:
        try:
            await self.server.handler(self, request)
        finally:
            self.server.in_flight -= 1


class H2Upstream:
    def __init__(
        self, handler: Handler = answer, *, max_streams: int = 100, auto_ack: bool = True
    ) -> None:
        self.handler = handler
        self.max_streams = max_streams
        self.auto_ack = auto_ack
        self.port = 0
        self.connections: list[ServerConnection] = []
        self.open_connections = 0
        self.requests: list[UpstreamRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.data_sent = 0
        self.bytes_received = 0

    async def start(self, nursery: trio.Nursery) -> H2Upstream:
        async def handle(stream: trio.SocketStream) -> None:
            connection = ServerConnection(self, stream, len(self.connections))
            self.connections.append(connection)
            self.open_connections += 1
            async with trio.open_nursery() as requests:
                await connection.serve(requests)
                requests.cancel_scope.cancel()

        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host=HOST))
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await trio.sleep(0.005)
