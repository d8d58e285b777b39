"""The HTTP/1.1 connection objects: :class:`ServerConnection` (reads requests, writes
responses) and :class:`ClientConnection` (writes requests, reads responses), each owning its
side's keep-alive state.

Every byte received goes through the strict parser first (parse.py). Most messages are then
taken on the *direct path*: a request or response read from the head the parser already
parsed, and written byte for byte as h11 writes it (write.py). The rest (a body in pieces or
chunked, 1xx, protocol switches, ``Expect``, HTTP/1.0, a head that came in pieces, anything
h11 would refuse) goes through h11. Which one a message takes is decided here, per message;
the caller sees one interface and one set of events either way:

- :class:`Request` or :class:`ResponseHead` for a head;
- ``bytes`` for body data;
- :data:`END` at the end of a message (a response's trailers are in ``trailers``);
- :data:`NEED_DATA` when more bytes must be received first;
- :data:`CLOSED` when the peer closed the connection between messages.

Errors: :class:`~.parse.Violation` for bytes received that break HTTP/1.1 (with the status a
client should get), :class:`~.write.Unwritable` for what we were asked to write and may not.

Sans-IO: bytes in, events out; events in, bytes out. No trio.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any, cast

from ..._h11 import h11
from ...headers import Headers, comma_tokens, connection_tokens
from .parse import Head, RequestChecker, ResponseChecker, Violation, response_has_no_body
from .write import (
    LAST_CHUNK,
    REASONS,
    Unwritable,
    chunk,
    close_connection,
    declared_length,
    direct_request,
    raw_response,
    response_head,
)

__all__ = [
    "CLOSED",
    "END",
    "NEED_DATA",
    "ClientConnection",
    "Request",
    "ResponseHead",
    "ServerConnection",
]


class Signal(Enum):
    NEED_DATA = "NEED_DATA"
    END = "END"
    CLOSED = "CLOSED"


NEED_DATA = Signal.NEED_DATA
END = Signal.END
CLOSED = Signal.CLOSED

# Requests taken on the direct path (the others, CONNECT included, go through h11).
_DIRECT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"POST", b"PUT", b"PATCH"})
# Request fields that need h11's handling: a body's framing, a protocol switch, 100-continue.
_H11_FIELDS = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


class Request:
    """A request head as the server side read it. ``headers``: lower-case names, OWS-trimmed
    values, Host taken out into ``authority`` (``None``: the request had none)."""

    __slots__ = (
        "authority",
        "content_length",
        "has_body",
        "headers",
        "http_version",
        "method",
        "target",
        "whole_body",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        authority: bytes | None,
        headers: Headers,
        http_version: bytes,
        content_length: int | None,
        has_body: bool,
        whole_body: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.headers = headers
        self.http_version = http_version  # b"1.1", b"1.0"
        self.content_length = content_length
        self.has_body = has_body  # body events follow, unless ``whole_body`` holds it all
        self.whole_body = whole_body

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r}>"


class ResponseHead:
    """A response head as the client side read it; ``headers`` have lower-case names."""

    __slots__ = ("headers", "informational", "status_code")

    def __init__(self, status_code: int, headers: Headers, *, informational: bool = False) -> None:
        self.status_code = status_code
        self.headers = headers
        self.informational = informational  # a 1xx (101 included): the final response follows

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status_code}>"


def _data_bytes(event: h11.Data) -> bytes:
    """The body bytes of h11's Data event, which may hold a bytearray or memoryview despite its
    annotation (read through Any, so that compiled code does not check it as bytes)."""
    data: Any = cast(Any, event).data
    return bytes(data)


_Sendable = h11.Request | h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
ServerEvent = Request | bytes | Signal
ClientEvent = ResponseHead | bytes | Signal


class ServerConnection:
    """The server side of one HTTP/1.1 connection: requests in, responses out, one at a time.

    Pipelined requests are read in order: the bytes of the next request wait here until the
    current response is complete and :meth:`start_next_cycle` is called.
    """

    def __init__(
        self, *, max_head_bytes: int, max_header_count: int, max_body_bytes: int = 0
    ) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self._checker = RequestChecker(
            max_head_bytes=max_head_bytes, max_header_count=max_header_count
        )
        self._max_body_bytes = max_body_bytes
        # A violation in the bytes received: the requests before it are still read, then
        # next_event raises it instead of asking for more data.
        self.violation: Violation | None = None
        self._next_direct: Request | None = None  # read on the direct path, not handed out
        self._next_close = False  # ... and its client asked to close after it
        self._direct = False  # the current cycle bypasses h11 (which stays idle)
        self._close = False  # ... and the connection closes after its response
        self._chunked = False  # ... whose body is chunked
        self._done = False  # ... and complete on the wire
        self._method = b""  # of the current request
        # Body bytes of the current response still due, once its head is written (None:
        # framed chunked, or until the close).
        self.body_left: int | None = None

    # -- reading ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed (or half-closed) its side."""
        if self.violation is not None:
            return
        checker = self._checker
        fed_at, heads = checker.offset, checker.heads
        try:
            checker.feed(data)
        except Violation as exc:
            self.violation = exc
            data = data[: exc.clean_bytes]  # requests ahead of the bad one are still served
            if not data:
                return  # (b"" would tell h11 the client closed)
        else:
            if (
                checker.heads == heads + 1
                and checker.head_start == fed_at
                and self._next_direct is None
                and self._h11.their_state is h11.IDLE
                and self._h11.our_state is h11.IDLE
                and not self._h11.trailing_data[0]
            ):
                head = checker.head
                assert head is not None
                after_head = checker.head_end - fed_at
                request = self._direct_request(head, data, after_head)
                if request is not None:
                    self._next_direct = request
                    # Whatever follows the request is the next one: h11 keeps it, in order.
                    data = data[after_head + (head.content_length or 0) :]
                    if not data:
                        return
        self._h11.receive_data(bytes(data))  # h11_mypyc takes bytes only

    def _direct_request(self, head: Head, data: bytes, body_start: int) -> Request | None:
        """The request as h11 would have read it, or None if it needs h11 (or its errors).

        A Content-Length body is taken only when all of it is in ``data`` already (small
        uploads: API calls, forms); a longer one streams through h11.
        """
        length = head.content_length
        body = None
        if length:
            limit = self._max_body_bytes
            if len(data) - body_start < length or (limit and length > limit):
                return None
            body = bytes(data[body_start : body_start + length])
        if (
            head.version != b"1.1"
            or head.chunked
            or head.method not in _DIRECT_METHODS
            or head.target[:1] != b"/"  # (the parser saw that it is visible ASCII)
        ):
            return None
        authority: bytes | None = None
        close = False
        headers: Headers = []
        for field in head.fields:
            name = field[0]
            if name == b"host":
                authority = field[1]
                continue
            if name in _H11_FIELDS:
                return None
            if name == b"connection" and b"close" in comma_tokens(field[1]):
                close = True
            headers.append(field)
        if authority is None:
            return None  # h11 answers a missing Host
        request = Request(
            head.method, head.target, authority, headers, b"1.1", length, body is not None, body
        )
        self._next_close = close
        return request

    def next_event(self) -> ServerEvent:
        """The next event of the request being read; :data:`NEED_DATA` if bytes are missing
        (raises the :class:`Violation` instead when the bytes received break HTTP/1.1)."""
        request = self._next_direct
        if request is not None:
            self._next_direct = None
            self._direct = True
            self._done = False
            self._close = self._next_close
            self._method = request.method
            return request
        state = self._h11.their_state
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            message = f"bad request body: {exc}" if state is h11.SEND_BODY else str(exc)
            raise Violation(message, exc.error_status_hint) from None
        if event is h11.NEED_DATA:
            if self.violation is not None:
                raise self.violation
            return NEED_DATA
        if isinstance(event, h11.Data):
            return _data_bytes(event)
        if isinstance(event, h11.EndOfMessage):
            return END  # (request trailers are not forwarded)
        if isinstance(event, h11.Request):
            self._direct = False
            self._close = False
            self._method = event.method
            return self._h11_request(event)
        return CLOSED  # ConnectionClosed (PAUSED is never asked for: one request at a time)

    def _h11_request(self, event: h11.Request) -> Request:
        authority: bytes | None = None
        headers: Headers = []
        content_length: int | None = None
        chunked = False
        # (The parser refused repeated or conflicting framing fields before h11 read them.)
        for name, value in event.headers:
            if name == b"host":
                authority = value
                continue
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            headers.append((name, value))
        has_body = chunked or bool(content_length)
        if not has_body:
            # A bodiless request's end is already read: take it now, so that the request
            # side is complete without anyone asking for it.
            end = self._h11.next_event()
            assert isinstance(end, h11.EndOfMessage), end
        return Request(
            event.method,
            event.target,
            authority,
            headers,
            event.http_version,
            content_length,
            has_body,
        )

    @property
    def direct(self) -> bool:
        """The current request was read on the direct path (h11 stays idle for its cycle)."""
        return self._direct

    @property
    def request_bytes_waiting(self) -> bool:
        """Bytes of a next request are here already, read or not."""
        return self._next_direct is not None or bool(self._h11.trailing_data[0])

    @property
    def upgrade_proposed(self) -> bool:
        """The current request proposed a protocol switch, and nothing but its answer may
        follow on the connection (no bytes the client sent behind it are read yet)."""
        # A documented h11 state that h11's __all__ leaves out.
        return not self._direct and self._h11.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]

    @property
    def waiting_for_100_continue(self) -> bool:
        return not self._direct and self._h11.they_are_waiting_for_100_continue

    # -- writing ---------------------------------------------------------------------------

    def send_informational(self, status: int, headers: Headers) -> bytes:
        """A 1xx response; nothing for a ``100 Continue`` nobody waits for."""
        if self._direct:
            return response_head(status, headers) if status != 100 else b""
        if status != 100 or self._h11.they_are_waiting_for_100_continue:
            return self._h11_send(
                h11.InformationalResponse,
                status_code=status,
                headers=headers,
                reason=REASONS.get(status, b""),
            )
        return b""

    def send_response(
        self,
        status: int,
        headers: Headers,
        body: bytes = b"",
        *,
        end: bool = False,
        close: bool = False,
    ) -> bytes:
        """The response head, with the start of its body (all of it, with ``end``).
        ``close``: the connection closes after this response (``Connection: close``)."""
        no_body = response_has_no_body(self._method, status)
        if self._direct:
            declared = declared_length(headers)
            self.body_left = 0 if no_body else declared
            self._chunked = self.body_left is None
            # As h11 does: a response of unknown length is framed chunked (a HEAD response
            # says so too, as the GET's would, but has no body).
            extra = (
                b"Transfer-Encoding: chunked\r\n"
                if declared is None and status != 204 and status != 304
                else b""
            )
            if close or self._close:
                self._close = True
                headers, value = close_connection(headers)
                extra += b"Connection: " + value + b"\r\n"
            data = response_head(status, headers, extra)
            if body:
                data += self._direct_body(body)
            if end:
                data += self._direct_end()
            return data
        if close:
            headers = [*headers, (b"connection", b"close")]
        data = self._h11_send(
            h11.Response, status_code=status, headers=headers, reason=REASONS.get(status, b"")
        )
        if body:
            data += self._h11_send(h11.Data, data=body)
        if end:
            data += self._h11_send(h11.EndOfMessage)
        self.body_left = 0 if no_body else declared_length(headers)
        if self.body_left is not None:
            self.body_left -= len(body)
        return data

    def send_data(self, data: bytes) -> bytes:
        if self._direct:
            return self._direct_body(data)
        if self.body_left is not None:
            self.body_left -= len(data)
        return self._h11_send(h11.Data, data=data)

    def send_end(self, trailers: Headers | None = None) -> bytes:
        """The end of the response: a chunked body's last chunk (with ``trailers``, which
        only a chunked response can carry: see ``can_send_trailers``), or nothing."""
        if self._direct:
            return self._direct_end(trailers)
        if trailers:
            return self._h11_send(h11.EndOfMessage, headers=trailers)
        return self._h11_send(h11.EndOfMessage)

    @property
    def can_send_trailers(self) -> bool:
        """The response being written is chunked, to an HTTP/1.1 client."""
        if self._direct:
            return self._chunked
        # Neither a Content-Length body nor one until the close (an HTTP/1.0 client).
        return self.body_left is None and self._h11.their_http_version == b"1.1"

    def send_switch(self, headers: Headers) -> tuple[bytes, bytes]:
        """``101 Switching Protocols``, and the bytes the client already sent behind its
        request: HTTP on this connection is over."""
        data = self._h11_send(
            h11.InformationalResponse, status_code=101, headers=headers, reason=REASONS[101]
        )
        return data, self._h11.trailing_data[0]

    def send_refusal(self, status: int, headers: Headers, body: bytes) -> bytes:
        """The answer to a request refused before it was forwarded (or to bytes that are no
        request), the connection closing after it; ``b""`` if a response was begun already."""
        method = self._method
        if not self._direct:
            ours, theirs = self._h11.our_state, self._h11.their_state
            if ours is not h11.IDLE and ours is not h11.SEND_RESPONSE:
                return b""
            if theirs is h11.SEND_BODY or theirs is h11.DONE:
                data = self._h11_send(
                    h11.Response,
                    status_code=status,
                    headers=headers,
                    reason=REASONS.get(status, b""),
                )
                if not response_has_no_body(method, status):
                    data += self._h11_send(h11.Data, data=body)
                return data + self._h11_send(h11.EndOfMessage)
            # h11 sends no response before it has read a request: hand-built bytes.
            method = b""
        self._done = self._close = True
        if response_has_no_body(method, status):
            body = b""
        return raw_response(status, headers, body)

    def send_failed(self) -> None:
        """The response was abandoned midway: the connection is not reused."""
        if not self._direct:
            self._h11.send_failed()
        self._close = True

    def _h11_send(self, event: Callable[..., _Sendable], **fields: Any) -> bytes:
        """``event(**fields)`` written by h11 (which may refuse to build it, or to send it)."""
        try:
            return self._h11.send(event(**fields))
        except h11.LocalProtocolError as exc:
            self._h11.send_failed()
            raise Unwritable(str(exc)) from None

    def _direct_body(self, data: bytes) -> bytes:
        if self.body_left is not None:
            if len(data) > self.body_left:
                raise Unwritable("too much data for the response's Content-Length")
            self.body_left -= len(data)
            return data
        return chunk(data)

    def _direct_end(self, trailers: Headers | None = None) -> bytes:
        if self.body_left:
            raise Unwritable("too little data for the response's Content-Length")
        self._done = True
        if not self._chunked:
            return b""
        if trailers:
            return b"0\r\n%b\r\n" % b"".join([b"%b: %b\r\n" % field for field in trailers])
        return LAST_CHUNK

    # -- the connection --------------------------------------------------------------------

    @property
    def response_complete(self) -> bool:
        """The current response is complete on the wire (its end may not be sent yet: a
        Content-Length body is complete with its last byte)."""
        if self.body_left == 0:
            return True
        if self._direct:
            return self._done
        return self._h11.our_state is h11.DONE or self._h11.our_state is h11.MUST_CLOSE

    def reusable(self) -> bool:
        """Both messages of the cycle are complete and neither side asked to close."""
        if self._direct:
            return self._done and not self._close
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        """After a reusable cycle: read the next request."""
        if not self._direct:
            self._h11.start_next_cycle()
        self._direct = False
        self.body_left = None


class ClientConnection:
    """The client side of one HTTP/1.1 connection: one request out, its response in, then
    (if :meth:`reusable`) the next."""

    def __init__(self, *, max_head_bytes: int) -> None:
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._checker = ResponseChecker(max_head_bytes=max_head_bytes)
        self.trailers: Headers = []  # of the last response, once it ended
        # The direct path: while ``_direct`` is set, the current request went out without
        # h11 and h11 is idle; the rest is that exchange's state.
        self._direct = False
        self._request: tuple[bytes, bytes, Headers, bytes] = (b"", b"", [], b"")  # for h11
        self._heads_before = 0  # the parser's head count when the request went out
        self._received: list[bytes] = []  # this response's bytes, until its head is taken
        self._pending = b""  # body bytes received and not yet handed out
        self._remaining = 0  # body bytes still due
        self._head_taken = False
        self._done = False  # the response is complete
        self._ended = False  # ... and END was handed out
        self._eof = False  # the upstream closed
        self._keep_alive = True
        self._leftover = False  # bytes arrived behind the response

    # -- writing ---------------------------------------------------------------------------

    def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        *,
        body: bytes = b"",
        end: bool,
        valid_syntax: bool = False,
    ) -> bytes:
        """The request head; with ``end`` the request is complete: bodiless, or with its
        whole ``body`` (framed by its Content-Length). ``valid_syntax``: the method, target
        and fields are known to be in the HTTP grammar (see ``write.direct_request``)."""
        self._checker.expect(method)
        self.trailers = []
        if end and self._h11.our_state is h11.IDLE:
            data = direct_request(method, target, headers, body, valid_syntax=valid_syntax)
            if data is not None:
                self._start_direct(method, target, headers, body)
                return data
        data = self._h11_send(h11.Request, method=method, target=target, headers=headers)
        if body:
            data += self._h11_send(h11.Data, data=body)
        if end:
            data += self._h11_send(h11.EndOfMessage)
        return data

    def send_data(self, data: bytes) -> bytes:
        return self._h11_send(h11.Data, data=data)

    def send_end(self) -> bytes:
        """The end of the request body: a chunked body's last chunk, or nothing."""
        return self._h11_send(h11.EndOfMessage)

    def _h11_send(self, event: Callable[..., _Sendable], **fields: Any) -> bytes:
        """``event(**fields)`` written by h11 (which may refuse to build it, or to send it)."""
        try:
            return self._h11.send(event(**fields))
        except h11.LocalProtocolError as exc:
            raise Unwritable(str(exc)) from None

    def _start_direct(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> None:
        self._direct = True
        self._request = (method, target, headers, body)
        self._heads_before = self._checker.heads
        self._received = []
        self._pending = b""
        self._remaining = 0
        self._head_taken = self._done = self._ended = self._eof = self._leftover = False
        self._keep_alive = True

    # -- reading ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server (``b""``: it closed); raises :class:`Violation` for bytes
        that break HTTP/1.1, and the connection is then unusable."""
        self._checker.feed(data)
        if not self._direct:
            self._h11.receive_data(data)
        elif not data:
            self._eof = True
        elif self._head_taken:
            self._pending = self._pending + data if self._pending else data
        else:
            self._received.append(data)

    def next_event(self) -> ClientEvent:
        if self._direct:
            if self._head_taken:
                chunk = self._take_body()
                if chunk:
                    return chunk
                if self._done:
                    if self._ended:
                        return NEED_DATA  # nothing more is due on this request
                    self._ended = True
                    return END
                if self._eof:
                    raise Violation(
                        "peer closed connection without sending complete message body "
                        f"({self._remaining} bytes missing)"
                    )
                return NEED_DATA
            if self._checker.heads == self._heads_before and not self._eof:
                return NEED_DATA
            head = self._direct_head()
            if head is not None:
                return head
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise Violation(str(exc), exc.error_status_hint) from None
        if event is h11.NEED_DATA:
            return NEED_DATA
        if isinstance(event, h11.Data):
            return _data_bytes(event)
        if isinstance(event, h11.Response):
            return ResponseHead(event.status_code, list(event.headers))
        if isinstance(event, h11.InformationalResponse):
            return ResponseHead(event.status_code, list(event.headers), informational=True)
        if isinstance(event, h11.EndOfMessage):
            self.trailers = list(event.headers)
            return END
        return CLOSED

    def _direct_head(self) -> ResponseHead | None:
        """The head of the response to a direct request, if it is one the direct path reads;
        else ``None``, after handing the exchange over to h11."""
        checker = self._checker
        head = checker.head
        method = self._request[0]
        if (
            self._eof  # mid-head: h11 says what that is
            or head is None
            or checker.heads != self._heads_before + 1  # a 1xx came first
            or head.status < 200
            or head.chunked
        ):
            self._fall_back()
            return None
        if response_has_no_body(method, head.status):
            self._remaining = 0
        elif head.content_length is not None:
            self._remaining = head.content_length
        else:  # a body until the upstream closes
            self._fall_back()
            return None
        received = self._received[0] if len(self._received) == 1 else b"".join(self._received)
        self._received = []
        self._pending = received[len(received) - (checker.offset - checker.head_end) :]
        self._head_taken = True
        fields = head.fields
        self._keep_alive = head.version >= b"1.1" and b"close" not in connection_tokens(fields)
        if not self._remaining:
            self._take_body()  # ends the response; anything received behind it is left over
        return ResponseHead(head.status, fields)

    def _fall_back(self) -> None:
        """Hand the current exchange to h11: the request as if h11 had sent it, then every
        byte of the response received so far."""
        self._direct = False
        method, target, headers, body = self._request
        # (The direct path's checks are stricter than h11's: it writes the same bytes.)
        self._h11_send(h11.Request, method=method, target=target, headers=headers)
        if body:
            self._h11_send(h11.Data, data=body)
        self._h11_send(h11.EndOfMessage)
        data = b"".join(self._received)
        self._received = []
        if data:
            self._h11.receive_data(data)
        if self._eof:
            self._h11.receive_data(b"")

    def _take_body(self) -> bytes:
        """The body bytes received and not yet handed out, up to the end of the response."""
        chunk = self._pending
        self._pending = b""
        if len(chunk) > self._remaining:
            self._leftover = True  # would be read as the next request's response
            chunk = chunk[: self._remaining]
        self._remaining -= len(chunk)
        if not self._remaining:
            self._done = True
        return chunk

    def buffered_body(self) -> tuple[bytes, bool]:
        """The response body received and not yet handed out, as far as it goes without
        more bytes, and whether the response ended there (``trailers`` is then set)."""
        if self._direct:
            body = self._take_body()
            if self._done:
                self._ended = True
            return body, self._done
        chunks: list[bytes] = []
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return b"".join(chunks), False
            if event is END:
                return b"".join(chunks), True
            if type(event) is bytes:
                chunks.append(event)
            else:
                raise Violation("peer closed the connection mid-body")

    # -- the connection --------------------------------------------------------------------

    @property
    def in_body(self) -> bool:
        """The response head was read and its body is not complete."""
        if self._direct:
            return self._head_taken and not self._done
        return self._h11.their_state is h11.SEND_BODY

    def reusable(self) -> bool:
        """The exchange completed with nothing behind it, and the server keeps the connection."""
        if self._direct:
            return self._done and self._keep_alive and not self._leftover
        return (
            self._h11.our_state is h11.DONE
            and self._h11.their_state is h11.DONE
            # Bytes behind a complete response would be read as the next request's response.
            and not self._h11.trailing_data[0]
        )

    def server_closes(self) -> bool:
        """The response completed, but the server closes the connection after it
        (``Connection: close``, HTTP/1.0)."""
        if self._direct:
            return self._done and not self._keep_alive
        return self._h11.their_state is h11.MUST_CLOSE or self._h11.their_state is h11.CLOSED

    @property
    def switched(self) -> bool:
        return self._h11.their_state is h11.SWITCHED_PROTOCOL

    @property
    def trailing_data(self) -> bytes:
        """Bytes received behind the last message (after a 101: the new protocol's)."""
        return self._h11.trailing_data[0]

    def start_next_cycle(self) -> None:
        if self._direct:
            self._direct = False  # h11 stayed idle through that exchange
        else:
            self._h11.start_next_cycle()
