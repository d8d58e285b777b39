"""One keep-alive HTTP/1.1 connection to an upstream server: a thin trio shell around h11,
with a fast path that does without h11 for the common exchange.

Everything above this module sees only :mod:`pooled_proxy.errors`, never trio or h11
exceptions: they are mapped once, here.

The fast path. Parsing and serializing with h11 was about a third of the proxy's CPU per
proxied request, yet most exchanges are the same simple thing: a bodiless request with
ordinary headers, answered by a final response framed by Content-Length (or with no body).
Such a request is written here by hand, byte for byte as h11 writes it, once a few regular
expressions have shown that h11 would accept it (anything else goes through h11, which then
refuses what is invalid as before). Every response byte goes through the strict framing
checks first anyway, and they parse each head completely: when the first head for the
request is such a final response, it is served from what the checks parsed, and its body is
the next Content-Length raw bytes. Any other response (1xx, 101, chunked, a body until
close, an early close) falls back: the request is replayed into h11 (its output discarded),
h11 gets every byte received for this response so far, and the response is read with h11
from there. The keep-alive rules are h11's: reusable only after a complete response with
nothing behind it, from an HTTP/1.1 upstream that did not say ``Connection: close``.
"""

from __future__ import annotations

import math
import re
import select
import ssl
from collections.abc import Callable
from typing import Any

import trio

from . import fastio
from ._h11 import h11
from .config import ServerAddress
from .errors import (
    ConnectTimeout,
    ProxyInternalError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTlsAlert,
    UpstreamTlsCertificateError,
    UpstreamTlsError,
)
from .headers import Headers, connection_tokens, keep_alive_timeout
from .protocol.abnf import TOKEN_CHAR
from .protocol.http1.parse import ResponseChecker, Violation

MAX_RECEIVE = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
# Retire a connection this long before the upstream's advertised Keep-Alive timeout, so we
# never send on a socket the upstream is about to close (the keep-alive race).
KEEPALIVE_SAFETY_MARGIN = 1.0

# A request head h11 would write as it is: method a token, target visible ASCII, each field
# a token name and a value of visible bytes with inner spaces or tabs only (h11 refuses
# leading or trailing whitespace, CR, LF, NUL and other whitespace; these are stricter).
_REQUEST_HEAD = re.compile(
    TOKEN_CHAR + rb"+ [!-~]+ HTTP/1\.1\r\n"
    rb"(?:" + TOKEN_CHAR + rb"+: (?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?\r\n)*\r\n"
)
_TOKENS = re.compile(TOKEN_CHAR + rb"*")
# Fields that change h11's state machine (keep-alive, a protocol switch, request body
# framing, 100-continue) and a second Host (h11 refuses it): such requests go through h11.
_STATEFUL_FIELD = re.compile(
    rb"\r\n(?:connection|content-length|transfer-encoding|upgrade|expect|host):", re.IGNORECASE
)
# The same for a request sent with its whole body, whose Content-Length is checked apart.
_STATEFUL_FIELD_BUT_LENGTH = re.compile(
    rb"\r\n(?:connection|transfer-encoding|upgrade|expect|host):", re.IGNORECASE
)


class ResponseHead:
    """A response head as the forwarder sees it; ``headers`` have lower-case names."""

    __slots__ = ("headers", "informational", "status_code")

    def __init__(self, status_code: int, headers: Headers, *, informational: bool = False) -> None:
        self.status_code = status_code
        self.headers = headers
        self.informational = informational  # a 1xx (101 included): the final response follows

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status_code}>"


async def open_connection(
    server: ServerAddress,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> UpstreamConnection:
    """A new connection to ``server``; see :func:`open_stream`."""
    stream = await open_stream(
        server, connect_timeout=connect_timeout, ssl_context=ssl_context, server_name=server_name
    )
    return UpstreamConnection(stream, server)


async def open_stream(
    server: ServerAddress,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> trio.abc.Stream:
    """A new byte stream to ``server``; an https:// one goes through a TLS handshake with
    ``ssl_context`` (its upstream's, built once), sending ``server_name`` (default: the
    server's host) as SNI and checking the certificate against it. Failures are raised as
    :mod:`pooled_proxy.errors` connect errors."""
    if server.tls and ssl_context is None:
        raise UpstreamTlsError(f"no TLS context for {server}")
    try:
        with trio.fail_after(connect_timeout or math.inf):
            stream: trio.abc.Stream = await trio.open_tcp_stream(server.host, server.port)
            if ssl_context is not None and server.tls:
                tls = trio.SSLStream(
                    stream,
                    ssl_context,
                    server_hostname=server_name or server.host,
                    https_compatible=True,
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                stream = tls
    except trio.TooSlowError:
        raise ConnectTimeout(f"connect to {server} timed out after {connect_timeout:g}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise _connect_error(server, exc) from None
    return stream


def _connect_error(server: ServerAddress, exc: BaseException) -> UpstreamConnectError:
    """A failed connect or TLS handshake, by its RFC 9209 kind."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    # The answer's details say why TLS failed, not with whom: "IP address mismatch,
    # certificate is not valid for '10.0.0.7'" goes on the wire as "IP address mismatch".
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = str(cause.verify_message)
        return UpstreamTlsCertificateError(
            f"TLS with {server}: certificate rejected: {why}",
            client_detail=f"certificate rejected: {why.split(',')[0]}",
        )
    if isinstance(cause, ssl.SSLError):
        why = cause.reason or str(cause)
        if "_ALERT_" in why:
            return UpstreamTlsAlert(
                f"TLS with {server}: the server sent the alert {why}",
                client_detail=f"the server sent the alert {why}",
            )
        return UpstreamTlsError(
            f"TLS handshake with {server} failed: {why}", client_detail=f"handshake failed: {why}"
        )
    return UpstreamConnectError(f"connect to {server} failed: {cause or exc}")


def _request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head as h11 writes it, names as given (``headers`` starts with Host)."""
    fields = b"\r\n".join(map(b": ".join, headers))
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, fields)


def _fast_request(
    method: bytes, target: bytes, headers: Headers, body: bytes = b""
) -> bytes | None:
    """The bytes h11 would send for this request, bodiless or with its whole ``body``, when
    it is one the fast path takes (see the module docstring); ``None`` sends it through h11."""
    if not headers or headers[0][0] != b"host" or method == b"CONNECT":
        return None
    if body:
        # Framed by the one Content-Length it carries, which must say what the body is.
        if [value for name, value in headers if name == b"content-length"] != [b"%d" % len(body)]:
            return None
        stateful = _STATEFUL_FIELD_BUT_LENGTH
    else:
        stateful = _STATEFUL_FIELD
    try:
        names = b"".join([name for name, _ in headers])
        data = _request_head(method, target, headers)
    except TypeError:  # not all bytes: h11 converts or refuses them
        return None
    request_line_length = len(method) + len(target) + 12  # "M T HTTP/1.1\r\n"
    if (
        not _TOKENS.fullmatch(names)  # so each name ends at its line's first ": "
        or not _REQUEST_HEAD.fullmatch(data)
        # a CR LF inside a value would have made two lines of one
        or data.count(b"\n") != len(headers) + 2
        # Host is first; nothing after it may be one of these
        or stateful.search(data, request_line_length + 6 + len(headers[0][1])) is not None
    ):
        return None
    return data + body if body else data


def _socket_of(stream: trio.abc.Stream) -> Any:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


class UpstreamConnection:
    """An h11 client connection. Used by one exchange at a time; the pool owns it in between."""

    http_version = b"1.1"  # for Via

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
        # The pool's: when it last went idle, how long it had been idle when last checked out
        # (0 while it has not been reused), and when the reaper checks it is still open.
        self.idle_since = 0.0
        self.idle_age = 0.0
        self.probe_at = math.inf
        self.closed = False
        self.send_failed = False
        self.upgraded = False  # switched protocols (101): a tunnel owns the stream now
        self.trailers: Headers = []
        # The exchange's Exchange.on_wait, called before a read has to wait for the upstream.
        self.on_wait: Callable[[], None] | None = None
        # Every response byte passes the strict framing checks before h11 reads it.
        self._checker = ResponseChecker(max_head_bytes=MAX_RESPONSE_HEAD)
        # The fast path (see the module docstring). While ``_fast`` is set, the current
        # request went out without h11 and h11 is idle; the rest is that exchange's state.
        self._fast = False
        self._request: tuple[bytes, bytes, Headers, bytes] = (
            b"",
            b"",
            [],
            b"",
        )  # replayed on fallback
        self._heads_before = 0  # the checker's head count when the request went out
        self._received: list[bytes] = []  # this response's bytes, until its head is taken
        self._pending = b""  # body bytes received and not yet handed out
        self._remaining = 0  # body bytes still due
        self._head_taken = False
        self._done = False  # the response is complete
        self._keep_alive = True
        self._leftover = False  # bytes arrived behind the response

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.server} requests={self.requests_sent}>"

    # -- state, all sync -------------------------------------------------------------------

    def is_reusable(self) -> bool:
        if self._fast:
            return (
                not self.closed
                and not self.send_failed
                and self._done
                and self._keep_alive
                and not self._leftover
            )
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
        if self._fast:
            return not self.send_failed and self._done and not self._keep_alive
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
        if self._fast:
            self._fast = False  # h11 stayed idle through that exchange
        else:
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
            raise UpstreamClosed(
                f"upstream {self.server} closed while we were sending: {exc}"
            ) from None

    async def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        *,
        end: bool,
        checked: bool = False,
        body: bytes = b"",
    ) -> None:
        """Send the request head; with ``end``, the request is complete: bodiless, or with
        its whole ``body`` (framed by its Content-Length), sent in the same write.

        ``checked``: every part of the head already passed the HTTP/1.1 framing checks and
        none changes h11's framing (see ``RequestHead.checked``), so it is written as it is.
        """
        self.requests_sent += 1
        self.received_bytes = 0
        self._checker.expect(method)
        if end and self._h11.our_state is h11.IDLE:
            if checked and not body:
                data: bytes | None = _request_head(method, target, headers)
            else:
                data = _fast_request(method, target, headers, body)
            if data is not None:
                self._start_fast(method, target, headers, body)
                await self._send(data)
                return
        try:
            data = self._h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += self._h11.send(h11.Data(data=body))
            if end:
                data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise self._unwritable(exc) from None
        await self._send(data)

    def _unwritable(self, exc: h11.LocalProtocolError) -> ProxyInternalError:
        """h11 refuses to write what we asked it to. Never the upstream's fault: the request
        validation (protocol/request_checks.py) should have refused the request first."""
        self.close()
        return ProxyInternalError(f"cannot write the request to {self.server}: {exc}")

    def _start_fast(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> None:
        self._fast = True
        self._request = (method, target, headers, body)
        self._heads_before = self._checker.heads
        self._received = []
        self._pending = b""
        self._remaining = 0
        self._head_taken = self._done = self._leftover = False
        self._keep_alive = True

    async def send_body(self, chunk: bytes) -> None:
        try:
            data = self._h11.send(h11.Data(data=chunk))
        except h11.LocalProtocolError as exc:
            raise self._unwritable(exc) from None
        await self._send(data)

    async def end_body(self) -> None:
        try:
            data = self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise self._unwritable(exc) from None
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

    async def _receive(self, deadline: float = math.inf) -> bytes:
        """The next bytes from the upstream, already checked (``b""`` when it closed);
        ``trio.TooSlowError`` if none came by ``deadline``."""
        try:
            data = await fastio.receive_some(self._stream, MAX_RECEIVE, self.on_wait, deadline)
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
        return data

    async def _next_event(self, deadline: float = math.inf) -> Any:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._parse_error(exc) from None
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive(deadline)
            self._h11.receive_data(bytes(data))  # h11_mypyc takes bytes only

    def _restart_keepalive_clock(self) -> None:
        """The upstream's keep-alive timer runs from the end of its response (Node's does), so
        ours restarts there too: a response streamed longer than N must not retire the
        connection the moment it ends."""
        if self.keepalive_advertised is not None:
            self.keepalive_expiry = trio.current_time() + max(
                0.0, self.keepalive_advertised - KEEPALIVE_SAFETY_MARGIN
            )

    async def receive_response_head(self, deadline: float = math.inf) -> ResponseHead:
        """The next response head (a 1xx, or the final one); ``trio.TooSlowError`` if it is
        not complete by ``deadline``."""
        if self._fast:
            head = await self._fast_response_head(deadline)
            if head is not None:
                return head
        event = await self._next_event(deadline)
        if isinstance(event, h11.Response):
            headers = list(event.headers)
            self.keepalive_advertised = keep_alive_timeout(headers)
            self._restart_keepalive_clock()
            return ResponseHead(event.status_code, headers)
        if isinstance(event, h11.InformationalResponse):
            return ResponseHead(event.status_code, list(event.headers), informational=True)
        self.close()
        raise UpstreamClosed(f"upstream {self.server} closed the connection before a response")

    async def _fast_response_head(self, deadline: float) -> ResponseHead | None:
        """The head of the response to a fast request, if it is one the fast path serves;
        else ``None``, after handing the exchange over to h11."""
        checker = self._checker
        eof = False
        while checker.heads == self._heads_before:
            data = await self._receive(deadline)
            if not data:
                eof = True  # mid-head: h11 says what that is
                break
            self._received.append(data)
        head = checker.head
        method = self._request[0]
        if (
            eof
            or head is None
            or checker.heads != self._heads_before + 1  # a 1xx came first
            or head.status < 200
            or head.chunked
        ):
            self._fall_back(eof)
            return None
        if head.status in (204, 304) or method == b"HEAD":
            self._remaining = 0
        elif head.content_length is not None:
            self._remaining = head.content_length
        else:  # a body until the upstream closes
            self._fall_back(False)
            return None
        received = self._received[0] if len(self._received) == 1 else b"".join(self._received)
        self._received = []
        self._pending = received[len(received) - (checker.offset - checker.head_end) :]
        self._head_taken = True
        fields = head.fields
        self._keep_alive = head.version >= b"1.1" and b"close" not in connection_tokens(fields)
        self.keepalive_advertised = keep_alive_timeout(fields)
        self._restart_keepalive_clock()
        if not self._remaining:
            self._take_body()  # ends the response; anything received behind it is left over
        return ResponseHead(head.status, fields)

    def _fall_back(self, eof: bool) -> None:
        """Hand the current exchange to h11: the request as if h11 had sent it, then every
        byte of the response received so far."""
        self._fast = False
        method, target, headers, body = self._request
        try:
            self._h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                self._h11.send(h11.Data(data=body))
            self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:  # the fast checks are stricter than h11's
            raise self._unwritable(exc) from None
        data = b"".join(self._received)
        self._received = []
        if data:
            self._h11.receive_data(data)
        if eof:
            self._h11.receive_data(b"")

    def _take_body(self) -> bytes:
        """The body bytes received and not yet handed out, up to the end of the response."""
        chunk = self._pending
        self._pending = b""
        if len(chunk) > self._remaining:
            self._leftover = True  # would be read as the next request's response
            chunk = chunk[: self._remaining]
        self._remaining -= len(chunk)
        if not self._remaining and not self._done:
            self._done = True
            self._response_ended([])
        return chunk

    async def receive_data(self, deadline: float = math.inf) -> bytes | None:
        """The next response body chunk as it arrived, or ``None`` at the end (see
        ``trailers``); ``trio.TooSlowError`` if nothing came by ``deadline``."""
        if self._fast:
            while True:
                chunk = self._take_body()
                if chunk:
                    return chunk
                if self._done:
                    return None
                data = await self._receive(deadline)
                if not data:
                    self.close()
                    raise UpstreamClosed(
                        f"upstream {self.server} closed the connection mid-response: peer closed "
                        f"connection without sending complete message body ({self._remaining} "
                        "bytes missing)"
                    )
                self._pending = data
        while True:
            event = await self._next_event(deadline)
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                self._response_ended(list(event.headers))
                return None
            self.close()
            raise UpstreamClosed(f"upstream {self.server} closed the connection mid-body")

    def buffered_body(self) -> tuple[bytes, bool]:
        """The response body that already arrived, as far as it can be had without waiting,
        and whether the response ended there (``trailers`` is then set).

        A small response usually arrives whole with its head: the forwarder then sends it
        to the client in one write instead of three.
        """
        if self._fast:
            return self._take_body(), self._done
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
                self._response_ended(list(event.headers))
                return b"".join(chunks), True
            else:
                self.close()
                raise UpstreamClosed(f"upstream {self.server} closed the connection mid-body")

    def _response_ended(self, trailers: Headers) -> None:
        self.trailers = trailers
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
        if self._fast:
            return self._head_taken and not self._done
        return self._h11.their_state is h11.SEND_BODY

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
