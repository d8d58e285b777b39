"""WebSocket peers over wsproto, on real sockets: an echo upstream and a client."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from tests.support.helpers import HOST


@dataclass
class WSEchoUpstream:
    """A wsproto echo server. ``greeting`` is sent in the same segment as the 101."""

    greeting: str | None = None
    handshakes: list[Request] = field(default_factory=list)
    refused: int = 0  # requests that were not WebSocket handshakes
    connections_open: int = 0
    closed: trio.Event = field(default_factory=trio.Event)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections_open += 1
        ws = WSConnection(ConnectionType.SERVER)
        try:
            async with stream:
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    try:
                        ws.receive_data(data or None)
                        events = list(ws.events())
                    except RemoteProtocolError:  # not a WebSocket handshake
                        self.refused += 1
                        await stream.send_all(
                            b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\n"
                            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        return
                    out = b""
                    done = not data
                    for event in events:
                        if isinstance(event, Request):
                            self.handshakes.append(event)
                            out += ws.send(AcceptConnection())
                            if self.greeting is not None:
                                out += ws.send(TextMessage(data=self.greeting))
                        elif isinstance(event, Message):
                            echo = type(event)(
                                data=event.data, message_finished=event.message_finished
                            )
                            out += ws.send(echo)
                        elif isinstance(event, CloseConnection):
                            if data:
                                out += ws.send(event.response())
                            done = True
                    if out:
                        await stream.send_all(out)
                    if done:
                        return  # the server closes TCP first, as RFC 6455 wants
        finally:
            self.connections_open -= 1
            self.closed.set()


class WSClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[object] = []

    @classmethod
    async def connect(cls, port: int, *, stream: trio.abc.Stream | None = None) -> WSClient:
        """Open a WebSocket through the proxy (on ``stream`` if given, e.g. a TLS one)."""
        client = cls(stream or await trio.open_tcp_stream(HOST, port))
        await client.stream.send_all(client.ws.send(Request(host="test.local", target="/ws")))
        event = await client.next_event()
        assert isinstance(event, AcceptConnection), event
        return client

    async def next_event(self) -> object:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def send(self, message: str | bytes) -> None:
        event = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        await self.stream.send_all(self.ws.send(event))

    async def receive(self) -> str | bytes:
        parts: list[str | bytes] = []
        while True:
            event = await self.next_event()
            assert isinstance(event, (TextMessage, BytesMessage)), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]

    async def close_handshake(self) -> CloseConnection:
        await self.stream.send_all(self.ws.send(CloseConnection(code=1000, reason="bye")))
        event = await self.next_event()
        assert isinstance(event, CloseConnection), event
        return event

    async def at_eof(self) -> bool:
        return await self.stream.receive_some(65536) == b""
