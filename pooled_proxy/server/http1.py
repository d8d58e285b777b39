"""The HTTP/1.1 front end: one h11 server connection per client, keep-alive, pipelining.

Requests on a connection are served one after another, so pipelined requests are answered
in order (h11 keeps the bytes of the next request buffered until we start its cycle).

The common request takes a fast path around h11: every head is parsed and checked in full
by the strict framing checks anyway (protocol/h1_checks.py), so an HTTP/1.1 request without
upgrade or ``Expect`` that arrives with its head whole in one read (and its Content-Length
body whole in the same read, if it has one), while h11 holds nothing, is taken from the
checker's parse, and its response is written by hand the way h11 writes it (see
``_fast_request_head`` and ``_fast_send_head``). Anything else goes to h11 as before, and
the next request may go fast again once h11 is idle.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator
from http import HTTPStatus
from typing import Any

import trio

from .. import fastio
from .._h11 import h11
from ..answers import error_response
from ..errors import (
    BodyTooLarge,
    ClientDisconnected,
    ClientError,
    ProxyError,
    RequestBodyTimeout,
    RequestHeaderTimeout,
)
from ..exchange import NO_BODY, Exchange, ExchangeRecord, RequestHead
from ..headers import Headers, comma_tokens, trailer_fields
from ..protocol.http1.parse import Head, RequestChecker, Violation
from ..protocol.request_checks import check_request
from ..proxy import Proxy
from ..tunnel import requested_upgrade

LOG = logging.getLogger("pooled_proxy.http1")

MAX_RECEIVE = 64 * 1024
CLOSE_TIMEOUT = 2.0  # how long a polite close may linger after an error answer
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


# Requests that may take the fast path (the others, CONNECT included, go through h11).
_FAST_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"POST", b"PUT", b"PATCH"})
# Request headers that need h11's handling: a body's framing, a protocol switch, 100-continue.
_SLOW_FIELDS = frozenset({b"transfer-encoding", b"upgrade", b"expect"})


class _Timeout(Exception):
    pass


class _FastRequest:
    """A request taken from the framing checker's parse, h11 bypassed: a bodiless one, or
    one whose whole Content-Length body came in the same read as its head."""

    __slots__ = ("body", "close", "head")

    def __init__(self, head: RequestHead, close: bool, body: bytes | None) -> None:
        self.head = head
        self.close = close  # the client sent Connection: close
        self.body = body


_FAST = object()  # _next_event's answer when a fast request arrived instead of h11 bytes


class HTTP1Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        proxy: Proxy,
        *,
        client_ip: bytes,
        scheme: bytes,
        initial_data: bytes = b"",
        head_deadline: float | None = None,
    ) -> None:
        self.stream = stream
        # When the first request head must be complete: header_timeout from the start of
        # the wait for the connection's first bytes (the listener's), not from now.
        self._first_head_deadline = head_deadline
        self.proxy = proxy
        self.client_ip = client_ip
        self.scheme = scheme
        server = proxy.server
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_header_bytes)
        self.checker = RequestChecker(
            max_head_bytes=server.max_header_bytes, max_header_count=server.max_header_count
        )
        self.violation: Violation | None = None
        self._fast_request: _FastRequest | None = None  # read, not yet served
        # The current exchange runs on the fast path: its response is written by hand.
        self._fast_cycle = False
        self._fast_close = False  # ... and the connection closes after it
        self._fast_chunked = False  # ... with a chunked body
        self._fast_done = False  # ... which is complete on the wire
        if initial_data:
            self._feed(initial_data)
        self.requests = 0
        self.head_sent = False
        self.record: ExchangeRecord  # the exchange in progress (set when it starts)
        self.close_after_response = False
        self.client_gone = False
        # The client watch (see _watch_client): one task per connection, started by the
        # first exchange that has to wait. Armed when an exchange whose request was read
        # whole starts waiting, it owns the receive side until it has read something (or
        # the end of the stream).
        self._nursery: trio.Nursery | None = None
        self._watching = False  # the watch task was started
        self._watch_armed = trio.Event()
        self._watch_delivered: trio.Event | None = None  # set when the armed watch read
        # The exchange in progress that a disconnect cancels (with the whole connection: the
        # nursery's scope, which costs nothing per request, unlike a cancel scope of its own).
        self._exchange_record: ExchangeRecord | None = None
        self.request_method = b""
        self.body_left: int | None = (
            None  # of a response with a known length, once its head is sent
        )

    # -- reading ---------------------------------------------------------------------------

    async def _receive(self, deadline: float) -> None:
        with trio.move_on_at(deadline) as scope:
            try:
                data = await fastio.receive_some(self.stream, MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
        if scope.cancelled_caught:
            raise _Timeout
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Hand client bytes to h11 only once the strict framing checks passed them.

        A violation (smuggling-shaped bytes, see protocol/h1_checks.py) is kept, and h11 gets
        nothing from the bad block on: what came before is served in order, then the next
        read answers the violation and closes.
        """
        if self.violation is not None:
            return
        checker = self.checker
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
                and self._fast_request is None
                and self.h11.their_state is h11.IDLE
                and self.h11.our_state is h11.IDLE
                and not self.h11.trailing_data[0]
            ):
                assert checker.head is not None
                after_head = checker.head_end - fed_at
                fast = self._fast_request_head(checker.head, data, after_head)
                if fast is not None:
                    self._fast_request = fast
                    # Whatever follows the request is the next one: h11 keeps it, in order.
                    data = data[after_head + (checker.head.content_length or 0) :]
                    if not data:
                        return
        self.h11.receive_data(bytes(data))  # h11_mypyc takes bytes only

    def _fast_request_head(self, head: Head, data: bytes, body_start: int) -> _FastRequest | None:
        """The request as h11 would have read it, or None if it needs h11 (or its errors).

        A Content-Length body is taken only when all of it is in ``data`` already (small
        uploads: API calls, forms); a longer one streams through h11 and an upload task.
        """
        length = head.content_length
        body = None
        if length:
            limit = self.proxy.server.max_body_bytes
            if len(data) - body_start < length or (limit and length > limit):
                return None
            body = bytes(data[body_start : body_start + length])
        if (
            head.version != b"1.1"
            or head.chunked
            or head.method not in _FAST_METHODS
            or head.target[:1] != b"/"  # (the framing checks saw that it is visible ASCII)
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
            if name in _SLOW_FIELDS:
                return None
            if name == b"connection" and b"close" in comma_tokens(field[1]):
                close = True
            headers.append(field)
        if authority is None:
            return None  # h11 answers a missing Host
        request = RequestHead(
            method=head.method,
            target=head.target,
            authority=authority,
            scheme=self.scheme,
            headers=headers,
            http_version=b"1.1",
            client_ip=self.client_ip,
            has_body=body is not None,
            content_length=length,
            checked=length is None,  # a Content-Length goes through the upstream's own checks
        )
        return _FastRequest(request, close, body)

    async def _next_event(self, deadline: float) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.violation is not None:
                self.close_after_response = True  # the answer says so: Connection: close
                raise ClientError(str(self.violation), status=self.violation.status)
            await self._receive(deadline)
            if self._fast_request is not None:
                return _FAST

    async def _wait_for_request_bytes(self) -> bool:
        """Idle between requests until the client sends more, times out, or we drain."""
        if (
            self._fast_request is not None
            or self.h11.trailing_data[0]
            or self.violation is not None
            or self.proxy.draining
        ):
            return not self.proxy.draining
        if self._watch_delivered is None:
            # The write that ended the last response yielded, so the client's next request
            # may be here already: then there is no need for a timer (a cancel scope).
            try:
                data = fastio.receive_now(self.stream, MAX_RECEIVE)
            except (trio.ClosedResourceError, OSError):
                return False
            if data is not None:
                # A request (or part of one, or a violation, or b"": the client closed) for
                # the next read to report.
                self._feed(data)
                return True
        scope = trio.CancelScope(deadline=trio.current_time() + self.proxy.server.keepalive_timeout)
        self.proxy.idle_waits.add(scope)
        try:
            with scope:
                delivered = self._watch_delivered
                if delivered is not None:
                    # The watch still waits on the socket: the next bytes come through it.
                    await delivered.wait()
                    if self.client_gone:
                        return False
                while (
                    self._fast_request is None
                    and not self.h11.trailing_data[0]
                    and self.h11.their_state is h11.IDLE
                ):
                    data = await fastio.receive_some(self.stream, MAX_RECEIVE)
                    self._feed(data)
                    if not data or self.violation is not None:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        finally:
            self.proxy.idle_waits.discard(scope)
        return not scope.cancelled_caught

    async def _read_request(self) -> h11.Request | _FastRequest | None:
        if self.requests and not await self._wait_for_request_bytes():
            return None
        fast = self._fast_request
        if fast is not None:
            self._fast_request = None
            return fast
        deadline = self._first_head_deadline
        if deadline is None or self.requests:
            deadline = trio.current_time() + self.proxy.server.header_timeout
        try:
            event = await self._next_event(deadline)
        except _Timeout:
            raise RequestHeaderTimeout(
                f"request head not complete within {self.proxy.server.header_timeout:g}s"
            ) from None
        except h11.RemoteProtocolError as exc:
            raise ClientError(str(exc), status=exc.error_status_hint) from None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if event is _FAST:
            fast, self._fast_request = self._fast_request, None
            return fast
        assert isinstance(event, h11.Request), event
        return event

    async def _request_body(self, limit: int) -> AsyncGenerator[bytes, None]:
        body_timeout = self.proxy.server.body_timeout or math.inf
        received = 0
        while True:
            try:
                event = await self._next_event(trio.current_time() + body_timeout)
            except _Timeout:
                self.close_after_response = True  # the answer says so: Connection: close
                raise RequestBodyTimeout(
                    f"request body stalled for {self.proxy.server.body_timeout:g}s"
                ) from None
            except h11.RemoteProtocolError as exc:
                self.close_after_response = True
                raise ClientError(
                    f"bad request body: {exc}", status=exc.error_status_hint
                ) from None
            if isinstance(event, h11.Data):
                received += len(event.data)
                if limit and received > limit:
                    self.close_after_response = True
                    raise BodyTooLarge(f"request body over max_body_bytes ({limit})")
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._arm_watch()  # read whole: the watch owns the receive side now
                return
            else:
                raise ClientDisconnected("client closed the connection mid-body")

    # -- writing (the ResponseSink protocol) -------------------------------------------------

    async def _write(self, data: bytes) -> None:
        write_timeout = self.proxy.server.write_timeout or math.inf
        try:
            await fastio.send_all(self.stream, data, write_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(f"client went away: {exc}") from None
        except trio.TooSlowError:
            raise ClientDisconnected(f"client did not read for {write_timeout:g}s") from None

    async def send_informational(self, status: int, headers: Headers) -> None:
        if self._fast_cycle:
            if status != 100:  # nobody waits for a 100 without Expect
                await self._write(_head_bytes(status, headers, b""))
            return
        if self.h11.they_are_waiting_for_100_continue or status != 100:
            await self._write(
                self.h11.send(
                    h11.InformationalResponse(
                        status_code=status, headers=headers, reason=REASONS.get(status, b"")
                    )
                )
            )

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        if self._fast_cycle:
            await self._fast_send_head(status, headers, body, end)
            return
        if self.proxy.draining or self.close_after_response:
            headers = [*headers, (b"connection", b"close")]
        try:
            data = self.h11.send(
                h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
            )
            if body:
                data += self.h11.send(h11.Data(data=body))
            if end:
                data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            self.h11.send_failed()
            raise ClientDisconnected(f"cannot send response: {exc}") from None
        self.head_sent = True
        self.body_left = _body_length(self.request_method, status, headers)
        if self.body_left is not None:
            self.body_left -= len(body)
        await self._write(data)  # head, body and end in one write
        self.record.bytes_out += len(body)

    async def _fast_send_head(self, status: int, headers: Headers, body: bytes, end: bool) -> None:
        """send_head on the fast path: the bytes h11 would write, framing included."""
        close = self._fast_close or self.proxy.draining or self.close_after_response
        declared = _declared_length(headers)
        bodiless = self.request_method == b"HEAD" or status in (204, 304)
        self.body_left = 0 if bodiless else declared
        self._fast_chunked = self.body_left is None
        # As h11 does: a response of unknown length is framed chunked (a HEAD response says
        # so too, as the GET's would, but has no body).
        chunked_framing = declared is None and status not in (204, 304)
        extra = b"Transfer-Encoding: chunked\r\n" if chunked_framing else b""
        if close:
            self._fast_close = True
            headers, connection = _without_connection(headers)
            extra += b"Connection: " + connection + b"\r\n"
        data = _head_bytes(status, headers, extra)
        if body:
            data += self._fast_body(body)
        if end:
            data += self._fast_end()
        self.head_sent = True
        await self._write(data)
        self.record.bytes_out += len(body)

    def _fast_body(self, data: bytes) -> bytes:
        if self.body_left is not None:
            if len(data) > self.body_left:
                raise ClientDisconnected(
                    "cannot send response: too much data for its Content-Length"
                )
            self.body_left -= len(data)
            return data
        return b"%x\r\n%b\r\n" % (len(data), data) if data else b""

    def _fast_end(self, trailers: Headers | None = None) -> bytes:
        if self.body_left:
            raise ClientDisconnected("cannot send response: too little data for its Content-Length")
        self._fast_done = True
        if not self._fast_chunked:
            return b""
        if trailers:
            return b"0\r\n%b\r\n" % b"".join([b"%b: %b\r\n" % field for field in trailers])
        return b"0\r\n\r\n"

    async def send_data(self, data: bytes) -> None:
        if self._fast_cycle:
            await self._write(self._fast_body(data))
        else:
            if self.body_left is not None:
                self.body_left -= len(data)
            await self._write(self.h11.send(h11.Data(data=data)))
        self.record.bytes_out += len(data)

    async def end(self, trailers: Headers | None = None) -> None:
        # Trailers go to a client that said it takes them (TE: trailers) on a chunked
        # response, the only framing that can carry them; otherwise they are dropped.
        if trailers:
            trailers = trailer_fields(trailers) if self._takes_trailers() else None
        if self._fast_cycle:
            data = self._fast_end(trailers)
            if data:
                await self._write(data)
            return
        data = self.h11.send(h11.EndOfMessage(headers=trailers) if trailers else h11.EndOfMessage())
        if data:  # a chunked body's last chunk; a Content-Length body has nothing left to send
            await self._write(data)

    def _takes_trailers(self) -> bool:
        """The response is chunked and its client sent ``TE: trailers`` (read only when there
        are trailers to send, so the common response pays nothing for it)."""
        if self._fast_cycle:
            if not self._fast_chunked:
                return False
        elif self.body_left is not None or self.h11.their_http_version != b"1.1":
            return False  # a Content-Length or a body until close (an HTTP/1.0 client)
        record = self._exchange_record
        return record is not None and any(
            name == b"te" and b"trailers" in comma_tokens(value)
            for name, value in record.request_headers
        )

    async def switch_protocols(self, headers: Headers) -> tuple[trio.abc.Stream, bytes]:
        """Send the upstream's 101; from here the connection belongs to a tunnel (ClientUpgrade)."""
        try:
            data = self.h11.send(
                h11.InformationalResponse(status_code=101, headers=headers, reason=REASONS[101])
            )
        except h11.LocalProtocolError as exc:
            self.h11.send_failed()
            raise ClientDisconnected(f"cannot switch protocols: {exc}") from None
        self.head_sent = True
        await self._write(data)
        return self.stream, self.h11.trailing_data[0]

    async def reset(self) -> None:
        """Abort: close the connection mid-response so the client sees it incomplete."""
        if not self._fast_cycle:
            self.h11.send_failed()
        await trio.aclose_forcefully(self.stream)

    # -- the connection ----------------------------------------------------------------------

    def _request_head(self, request: h11.Request) -> RequestHead:
        server = self.proxy.server
        if len(request.headers) > server.max_header_count:
            raise ClientError(f"more than {server.max_header_count} request headers", status=431)
        authority = b""
        headers: Headers = []
        content_length: int | None = None
        chunked = False
        for name, value in request.headers:
            if name == b"host":
                authority = value
                continue
            if name == b"content-length":
                if content_length is not None:
                    raise ClientError("repeated Content-Length")
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            headers.append((name, value))
        if chunked and content_length is not None:
            raise ClientError("both Content-Length and Transfer-Encoding")
        if request.method == b"CONNECT":
            raise ClientError("CONNECT is not supported by a reverse proxy", status=405)
        target, scheme = request.target, self.scheme
        if not target.startswith(b"/") and target != b"*":
            scheme, target, authority = _origin_form(target)
        # The framing checks read the method, the target's bytes and the fields already.
        check_request(
            request.method,
            target,
            authority,
            scheme=scheme,
            version=request.http_version,
            syntax_checked=True,
        )
        return RequestHead(
            method=request.method,
            target=target,
            authority=authority,
            scheme=self.scheme,
            headers=headers,
            http_version=request.http_version,
            client_ip=self.client_ip,
            has_body=chunked or bool(content_length),
            content_length=content_length,
        )

    async def serve(self) -> None:
        """Serve requests until the client or a limit closes the connection."""
        self.proxy.connections_by_protocol["http/1.1"] += 1
        try:
            async with trio.open_nursery() as nursery:  # for the client watch
                self._nursery = nursery
                try:
                    while await self._serve_one():
                        if not self._fast_cycle:
                            self.h11.start_next_cycle()
                except ClientDisconnected:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self.proxy.connections_by_protocol["http/1.1"] -= 1
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await self.stream.aclose()

    async def _serve_one(self) -> bool:
        """One request-response cycle; True if the connection can carry another."""
        now = trio.current_time()
        record = ExchangeRecord(start=now, wall_start=time.time(), client_ip=self.client_ip)
        self._fast_cycle = False
        whole_body: bytes | None = None
        try:
            request = await self._read_request()
            if request is None:
                return False
            # The exchange starts now, not when the wait for it began (an idle keep-alive
            # connection can wait minutes): the access log's time says when it came.
            record.start, record.wall_start = trio.current_time(), time.time()
            if isinstance(request, _FastRequest):
                head, whole_body = request.head, request.body
                self._fast_cycle, self._fast_close = True, request.close
                self._fast_chunked = self._fast_done = False
                record.method, record.target = head.method, head.target
                record.protocol = b"HTTP/1.1"
                check_request(
                    head.method,
                    head.target,
                    head.authority,
                    scheme=self.scheme,
                    version=b"1.1",
                    syntax_checked=True,
                )
            else:
                head = self._h11_request_head(request, record)
        except ProxyError as exc:
            await self._answer_and_close(exc, record)
            return False
        self.requests += 1
        server = self.proxy.server
        limit = server.max_requests_per_connection
        self.close_after_response = bool(limit and self.requests >= limit)
        if server.max_body_bytes and (head.content_length or 0) > server.max_body_bytes:
            await self._answer_and_close(
                BodyTooLarge(f"Content-Length over max_body_bytes ({server.max_body_bytes})"),
                record,
            )
            return False
        upload = (
            self._request_body(server.max_body_bytes)
            if head.has_body and whole_body is None
            else None
        )
        upgrade = None if self._fast_cycle or not self._may_upgrade(head) else self
        exchange = Exchange(
            head=head,
            body=NO_BODY if upload is None else upload,
            whole_body=whole_body,
            sink=self,
            record=record,
            upgrade=upgrade,
            # A bodiless exchange watches the client only once it has to wait upstream; one
            # with a body, once the body is read (_request_body), never while it is read; a
            # tunnel reads the client itself.
            on_wait=self._arm_watch if upload is None and upgrade is None else None,
        )
        self.head_sent = False
        self.record = record
        self.request_method = head.method
        self.body_left = None
        self.proxy.active_exchanges += 1
        try:
            if upgrade is None:  # a tunnel reads the client itself
                self._exchange_record = record
            await self.proxy.forwarder.forward(exchange)
        finally:
            self._exchange_record = None
            self.proxy.active_exchanges -= 1
            if upload is not None:
                await upload.aclose()  # one the exchange abandoned (413, early answer, cancel)
        if self._fast_cycle:
            return (
                not self.client_gone
                and self._fast_done
                and not self._fast_close
                and not self.proxy.draining
            )
        return (
            not self.client_gone
            and self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
            and not self.proxy.draining
        )

    def _h11_request_head(self, request: h11.Request, record: ExchangeRecord) -> RequestHead:
        record.method, record.target = request.method, request.target
        record.protocol = b"HTTP/" + request.http_version
        head = self._request_head(request)
        if not head.has_body:
            # A bodiless request's EndOfMessage is already parsed; take it now so the
            # client side reaches DONE without a body reader.
            end = self.h11.next_event()
            assert isinstance(end, h11.EndOfMessage), end
        return head

    def _arm_watch(self) -> None:
        """The exchange's request is read whole and it is about to wait for the upstream (or
        the pool): from now the watch owns the receive side. Idempotent."""
        if (
            self._exchange_record is None
            or self._watch_delivered is not None
            or self._fast_request is not None
            or self.h11.trailing_data[0]
            or self._nursery is None
        ):
            # A tunnel, the watch already armed, or the next request already here.
            return
        if not self._watching:
            self._watching = True
            self._nursery.start_soon(self._watch_client)
        self._watch_delivered = trio.Event()
        self._watch_armed.set()

    async def _watch_client(self) -> None:
        """Cancel the exchange as soon as the client closes its connection.

        Otherwise a client leaving a quiet SSE stream or a slow response would only be noticed
        at the next write, which may be minutes away; cancelled, the exchange closes its
        upstream connection instead of pooling it, so the upstream sees the disconnect too.
        Like nginx, a half-close (EOF) counts as leaving. Bytes that arrive instead are the
        next request (pipelined, or sent after the response): they are kept for the next
        cycle and the watch ends until the next exchange arms it.

        One task for the connection's life rather than one per exchange, started the first
        time an exchange has to wait (Exchange.on_wait: for the pool or the upstream; one
        answered at once never needs it, and then costs no task switch). Armed, it keeps
        waiting through the end of the exchange into the idle time after it, so the next
        request arrives through it and nothing is started or cancelled per request.
        """
        while True:
            await self._watch_armed.wait()
            try:
                data = await fastio.receive_some(self.stream, MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            self._watch_armed = trio.Event()
            delivered, self._watch_delivered = self._watch_delivered, None
            if data:
                self._feed(data)
            else:
                self.client_gone = True
                record = self._exchange_record
                # Gone after the whole response (a Content-Length body is complete on the
                # wire before end() runs) is a normal close, not a disconnect.
                if record is not None and not (self._response_complete() or self.body_left == 0):
                    record.error = record.error or ClientDisconnected.proxy_status
                    if self._nursery is not None:
                        self._nursery.cancel_scope.cancel()  # the exchange and the connection
            if delivered is not None:
                delivered.set()

    def _response_complete(self) -> bool:
        return self._fast_done if self._fast_cycle else self.h11.our_state is h11.DONE

    def _may_upgrade(self, head: RequestHead) -> bool:
        """A bodiless HTTP/1.1 request asking for a WebSocket that h11 holds as a switch proposal.

        Not when the client already sent bytes behind it that are not HTTP (it must wait for
        the 101, RFC 6455 4.1): the request goes up as an ordinary one, and those bytes are
        then answered 400 like any other violation, never tunneled with a gap in them.
        """
        return (
            not head.has_body
            and self.violation is None
            # A documented h11 state that h11's __all__ leaves out.
            and self.h11.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
            and requested_upgrade(head.headers) is not None
        )

    async def _answer_and_close(self, exc: ProxyError, record: ExchangeRecord) -> None:
        """Answer an error found before any exchange started, then close the connection."""
        status, headers, body = error_response(exc)
        record.status, record.error = status, exc.proxy_status
        headers.append((b"connection", b"close"))
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            # h11 refuses to send a response before it has seen a request; a bad or missing
            # request head gets hand-built bytes instead.
            if self.h11.their_state is h11.SEND_BODY or self.h11.their_state is h11.DONE:
                data = self.h11.send(
                    h11.Response(
                        status_code=status, headers=headers, reason=REASONS.get(status, b"")
                    )
                )
                if record.method != b"HEAD":  # h11 refuses a body on a HEAD response
                    data += self.h11.send(h11.Data(data=body))
                data += self.h11.send(h11.EndOfMessage())
            else:
                data = _raw_response(status, headers, body)
            await self._write(data)
        except (ClientDisconnected, h11.LocalProtocolError):
            return
        finally:
            record.duration = trio.current_time() - record.start
            for observer in self.proxy.forwarder.observers:
                observer(record)


def _declared_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _body_length(method: bytes, status: int, headers: Headers) -> int | None:
    """The response body's length as framed on the wire, or None if only its end tells."""
    if method == b"HEAD" or status in (204, 304):
        return 0
    return _declared_length(headers)


def _head_bytes(status: int, headers: Headers, extra: bytes) -> bytes:
    """A response head as h11 writes it; ``extra`` is header lines to end it with."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
    for name, value in headers:
        lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(extra)
    lines.append(b"\r\n")
    return b"".join(lines)


def _raw_response(status: int, headers: Headers, body: bytes) -> bytes:
    """A whole response as it is, for answers h11 cannot send (no request read yet)."""
    return _head_bytes(status, headers, b"") + body


def _without_connection(headers: Headers) -> tuple[Headers, bytes]:
    """``headers`` without Connection, and the Connection value that closes (as h11 builds it)."""
    tokens = {b"close"}
    kept: Headers = []
    for field in headers:
        if field[0] == b"connection":
            tokens.update(comma_tokens(field[1]))
        else:
            kept.append(field)
    tokens.discard(b"keep-alive")
    return kept, b", ".join(sorted(tokens))


def _origin_form(target: bytes) -> tuple[bytes, bytes, bytes]:
    """absolute-form (``http://host/path``) -> its scheme, origin-form and authority; the
    target's host wins over Host (RFC 9112 3.2.2). The request validation judges all three."""
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise ClientError("request target must be origin-form or absolute-form")
    host, slash, path = rest.partition(b"/")
    return scheme, (b"/" + path if slash else b"/"), host
