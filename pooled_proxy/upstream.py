"""One keep-alive HTTP/1.1 connection to an upstream server: a thin trio shell around h11.

Everything above this module sees only :mod:`pooled_proxy.errors`, never trio or h11
exceptions: they are mapped once, here.
"""

from __future__ import annotations

import math
import select
import ssl
from typing import Any

import trio

from ._h11 import h11
from . import fastio
from .config import ServerAddress
from .errors import (
    ConnectTimeout,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
)
from .headers import Headers, keep_alive_timeout
from .protocol.h1_checks import ResponseChecker, Violation

MAX_RECEIVE = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
# Retire a connection this long before the upstream's advertised Keep-Alive timeout, so we
# never send on a socket the upstream is about to close (the keep-alive race).
KEEPALIVE_SAFETY_MARGIN = 1.0


async def open_connection(
    server: ServerAddress, *, connect_timeout: float, ssl_context: ssl.SSLContext | None = None
) -> UpstreamConnection:
    try:
        with trio.fail_after(connect_timeout or math.inf):
            stream: trio.abc.Stream = await trio.open_tcp_stream(server.host, server.port)
            if server.tls:
                context = ssl_context or ssl.create_default_context()
                tls = trio.SSLStream(stream, context, server_hostname=server.host, https_compatible=True)
                await tls.do_handshake()
                stream = tls
    except trio.TooSlowError:
        raise ConnectTimeout(f"connect to {server} timed out after {connect_timeout:g}s") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise UpstreamConnectError(f"connect to {server} failed: {exc}") from None
    return UpstreamConnection(stream, server)


def _socket_of(stream: trio.abc.Stream) -> Any:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


class UpstreamConnection:
    """An h11 client connection. Used by one exchange at a time; the pool owns it in between."""

    def __init__(self, stream: trio.abc.Stream, server: ServerAddress) -> None:
        self.server = server
        self._stream = stream
        self._socket = _socket_of(stream)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.requests_sent = 0
        self.received_bytes = 0  # of the current response, to tell a stale socket from a bad reply
        self.keepalive_expiry: float | None = None  # from the upstream's Keep-Alive header
        self.keepalive_advertised: float | None = None  # its timeout=N, in seconds
        self.connect_time: float | None = None  # seconds it took to open, set by the pool
        self.closed = False
        self.send_failed = False
        self.upgraded = False  # switched protocols (101): a tunnel owns the stream now
        self.trailers: Headers = []
        # Every response byte passes the strict framing checks before h11 reads it.
        self._checker = ResponseChecker(max_head_bytes=MAX_RESPONSE_HEAD)

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.server} requests={self.requests_sent}>"

    # -- state, all sync -------------------------------------------------------------------

    def is_reusable(self) -> bool:
        return (
            not self.closed
            and not self.send_failed
            and self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            # Bytes behind a complete response would be read as the next request's response.
            and not self._h11.trailing_data[0]
        )

    def upstream_ends_connection(self) -> bool:
        """The response completed, but the upstream closes after it (``Connection: close``,
        HTTP/1.0): a normal end of the connection, not a failure."""
        return not self.send_failed and self._h11.their_state in (h11.MUST_CLOSE, h11.CLOSED)

    def is_readable(self) -> bool:
        """An idle connection that is readable has been closed (or broken) by the upstream."""
        if self.closed or self._socket is None:
            return self.closed
        try:
            readable, _, _ = select.select([self._socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def prepare_reuse(self) -> None:
        self._h11.start_next_cycle()

    def close(self) -> None:
        """Close at once, without a TLS goodbye: used for failed, cancelled and expired connections."""
        if self.closed:
            return
        self.closed = True
        if self._socket is not None:
            self._socket.close()

    # -- I/O ---------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        try:
            await fastio.send_all(self._stream, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # Not closed yet: the upstream may have answered early (a 413, say) before closing,
            # and that answer is still waiting in our receive buffer.
            self.send_failed = True
            raise UpstreamClosed(f"upstream {self.server} closed while we were sending: {exc}") from None

    async def send_request(
        self, method: bytes, target: bytes, headers: Headers, *, end: bool
    ) -> None:
        """Send the request head; with ``end``, the request has no body and is complete."""
        self.requests_sent += 1
        self.received_bytes = 0
        self._checker.expect(method)
        try:
            data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
            if end:
                data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            self.close()
            raise UpstreamProtocolError(f"cannot send request upstream: {exc}") from None
        await self._send(data)

    async def send_body(self, chunk: bytes) -> None:
        await self._send(self._h11.send(h11.Data(data=chunk)))

    async def end_body(self) -> None:
        data = self._h11.send(h11.EndOfMessage())
        # After a Content-Length body there is nothing to send, and no checkpoint either: the
        # upload counts as done in the same step as its last byte went out, even when the
        # upstream's whole answer is already back and the exchange is being wound up.
        if data:
            await self._send(data)

    def _parse_error(self, exc: h11.RemoteProtocolError) -> UpstreamProtocolError | UpstreamClosed:
        self.close()
        if self.received_bytes and self._h11.their_state is not h11.SEND_BODY:
            return UpstreamProtocolError(f"bad response from {self.server}: {exc}")
        return UpstreamClosed(f"upstream {self.server} closed the connection mid-response: {exc}")

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._parse_error(exc) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await fastio.receive_some(self._stream, MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.close()
                raise UpstreamClosed(f"upstream {self.server} reset the connection: {exc}") from None
            if not data and not self.received_bytes:
                self.close()
                raise UpstreamClosed(f"upstream {self.server} closed the connection before responding")
            self.received_bytes += len(data)
            try:
                self._checker.feed(data)
            except Violation as exc:
                self.close()
                raise UpstreamProtocolError(f"bad response from {self.server}: {exc}") from None
            self._h11.receive_data(bytes(data))  # h11_mypyc takes bytes only

    def _restart_keepalive_clock(self) -> None:
        """The upstream's keep-alive timer runs from the end of its response (Node's does), so
        ours restarts there too: a response streamed longer than N must not retire the
        connection the moment it ends."""
        if self.keepalive_advertised is not None:
            self.keepalive_expiry = trio.current_time() + max(
                0.0, self.keepalive_advertised - KEEPALIVE_SAFETY_MARGIN
            )

    async def receive_response_head(self) -> h11.Response | h11.InformationalResponse:
        event = await self._next_event()
        if isinstance(event, (h11.Response, h11.InformationalResponse)):
            if isinstance(event, h11.Response):
                self.keepalive_advertised = keep_alive_timeout(event.headers)
                self._restart_keepalive_clock()
            return event
        self.close()
        raise UpstreamClosed(f"upstream {self.server} closed the connection before a response")

    async def receive_data(self) -> bytes | None:
        """The next response body chunk as it arrived, or ``None`` at the end (see ``trailers``)."""
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._response_ended(event)
                return None
            self.close()
            raise UpstreamClosed(f"upstream {self.server} closed the connection mid-body")

    def buffered_body(self) -> tuple[bytes, bool]:
        """The response body that already arrived, as far as it can be had without waiting,
        and whether the response ended there (``trailers`` is then set).

        A small response usually arrives whole with its head: the forwarder then sends it
        to the client in one write instead of three.
        """
        chunks: list[bytes] = []
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._parse_error(exc) from None
            if event is h11.NEED_DATA:
                return b"".join(chunks), False
            if isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._response_ended(event)
                return b"".join(chunks), True
            else:
                self.close()
                raise UpstreamClosed(f"upstream {self.server} closed the connection mid-body")

    def _response_ended(self, event: h11.EndOfMessage) -> None:
        self.trailers = list(event.headers)
        self._restart_keepalive_clock()

    def detach(self) -> tuple[trio.abc.Stream, bytes]:
        """After a ``101``: the raw stream and the bytes the upstream sent behind the 101 head.

        The connection is spent (h11 is in SWITCHED_PROTOCOL, so it is never reusable); the
        caller closes it when the tunnel ends.
        """
        self.upgraded = True
        return self._stream, self._h11.trailing_data[0]

    @property
    def expects_more_response(self) -> bool:
        return self._h11.their_state is h11.SEND_BODY

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
