"""A hand-driven HTTP/2 client (h2 over a real socket) for tests that need frame-level control:
resets, windows that never open, floods. Everyday requests in tests go through httpx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

import h2.config
import h2.connection
import h2.events
import trio
from hyperframe.frame import Frame, GoAwayFrame

from tests.support.helpers import HOST


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass
class H2Reply:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset_code: int | None = None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class H2Client:
    """Sends what it is told; reads frames into per-stream replies; credits windows only if
    ``auto_ack`` (a client that never opens its window is ``auto_ack=False``)."""

    def __init__(self, stream: trio.abc.Stream, *, auto_ack: bool = True) -> None:
        self.stream = stream
        self.auto_ack = auto_ack
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.replies: dict[int, H2Reply] = {}
        self.events: list[Any] = []
        # GOAWAY frames are taken out before h2 sees them: h2 stops processing anything
        # after a GOAWAY (python-hyper/h2#1181), and the streams in flight must go on.
        self.goaways: list[GoAway] = []
        self.closed = False  # the server closed the socket
        self.data_bytes = 0
        self.received = bytearray()  # every byte the server sent, as it came
        self._pending = bytearray()

    @classmethod
    async def connect(cls, port: int, **kwargs: Any) -> H2Client:
        client = cls(await trio.open_tcp_stream(HOST, port), **kwargs)
        client.conn.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    def request_headers(
        self,
        method: str,
        path: str,
        extra: list[tuple[str, str]] | None = None,
        authority: str = "test.local",
    ) -> list[tuple[bytes, bytes]]:
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in extra or []]
        return headers

    async def start(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.replies[stream_id] = H2Reply()
        self.conn.send_headers(
            stream_id, self.request_headers(method, path, headers), end_stream=end and body is None
        )
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        await self.flush()
        return stream_id

    async def receive(self) -> bool:
        """Read once and process; False when the server closed the connection."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.received += data
        for event in self.conn.receive_data(self._without_goaway(data)):
            self.events.append(event)
            self._apply(event)
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server is gone; what it sent before going is still read
        return True

    def _without_goaway(self, data: bytes) -> bytes:
        self._pending += data
        out = bytearray()
        while len(self._pending) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._pending[:9]))
            if len(self._pending) < 9 + length:
                break
            raw = bytes(self._pending[: 9 + length])
            del self._pending[: 9 + length]
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(raw[9:]))
                self.goaways.append(
                    GoAway(frame.last_stream_id, frame.error_code, frame.additional_data)
                )
            else:
                out += raw
        return bytes(out)

    @property
    def goaway(self) -> GoAway | None:
        return self.goaways[-1] if self.goaways else None

    def _apply(self, event: Any) -> None:
        stream_id = getattr(event, "stream_id", None)
        reply = self.replies.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and reply is not None:
            reply.headers = list(event.headers)
            reply.status = int(dict(reply.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.data_bytes += len(event.data)
            if reply is not None:
                reply.body += event.data
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and reply is not None:
            reply.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and reply is not None:
            reply.ended = True
        elif isinstance(event, h2.events.StreamReset) and reply is not None:
            reply.reset_code = event.error_code

    async def until(self, predicate: Any) -> None:
        while not predicate():
            if not await self.receive():
                return

    async def response(self, stream_id: int) -> H2Reply:
        reply = self.replies[stream_id]
        await self.until(lambda: reply.ended or reply.reset_code is not None)
        return reply

    async def get(self, path: str, **kwargs: Any) -> H2Reply:
        return await self.response(await self.start("GET", path, **kwargs))

    async def read_until_closed(self) -> None:
        while await self.receive():
            pass

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
