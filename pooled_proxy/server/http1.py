"""The HTTP/1.1 front end: the connection loop, one per client, with keep-alive and pipelining.

The server side of the HTTP/1.1 codec (``protocol/http1``) reads the requests and writes the
responses; the loop here reads a request, hands the exchange to the forwarder and decides
whether the connection carries another. Requests on a connection are served one after
another, so pipelined requests are answered in order (the codec keeps the bytes of the next
request until the current cycle is over). The response writer (``http1_response.py``) is
what the forwarder writes to; the client watch (``client_watch.py``) notices a client that
leaves while its exchange waits.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncGenerator

import trio

from .. import fastio
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
from ..protocol.http1 import END, NEED_DATA, Request, ServerConnection, Unwritable, Violation
from ..protocol.http1.connection import ServerEvent
from ..protocol.request_checks import check_request
from ..proxy import Proxy
from ..tunnel import requested_upgrade
from .client_watch import ClientWatch
from .http1_response import ResponseWriter

LOG = logging.getLogger("pooled_proxy.http1")


class _Timeout(Exception):
    pass


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
        self.http = ServerConnection(
            max_head_bytes=server.max_header_bytes,
            max_header_count=server.max_header_count,
            max_body_bytes=server.max_body_bytes,
        )
        if initial_data:
            self.http.receive_data(initial_data)
        self.response = ResponseWriter(stream, self.http, proxy)
        self.watch = ClientWatch(stream, self.http)
        self.requests = 0

    # -- reading ---------------------------------------------------------------------------

    async def _receive(self, deadline: float) -> None:
        with trio.move_on_at(deadline) as scope:
            try:
                data = await fastio.receive_some(self.stream, fastio.MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
        if scope.cancelled_caught:
            raise _Timeout
        self.http.receive_data(data)

    async def _next_event(self, deadline: float) -> ServerEvent:
        while True:
            try:
                event = self.http.next_event()
            except Violation as exc:
                # Smuggling-shaped bytes (see protocol/http1/parse.py), or bytes h11 refuses:
                # what came before was served in order; this is answered, then the close.
                self.response.close_after = True  # the answer says so: Connection: close
                raise ClientError(str(exc), status=exc.status) from None
            if event is not NEED_DATA:
                return event
            await self._receive(deadline)

    async def _wait_for_request_bytes(self) -> bool:
        """Idle between requests until the client sends more, times out, or we drain."""
        http = self.http
        if http.request_bytes_waiting or http.violation is not None or self.proxy.draining:
            return not self.proxy.draining
        watch = self.watch
        if watch.delivered is None:
            # The write that ended the last response yielded, so the client's next request
            # may be here already: then there is no need for a timer (a cancel scope).
            try:
                data = fastio.receive_now(self.stream, fastio.MAX_RECEIVE)
            except (trio.ClosedResourceError, OSError):
                return False
            if data is not None:
                # A request (or part of one, or a violation, or b"": the client closed) for
                # the next read to report.
                http.receive_data(data)
                return True
        scope = trio.CancelScope(deadline=trio.current_time() + self.proxy.server.keepalive_timeout)
        self.proxy.idle_waits.add(scope)
        try:
            with scope:
                delivered = watch.delivered
                if delivered is not None:
                    # The watch still waits on the socket: the next bytes come through it.
                    await delivered.wait()
                    if watch.client_gone:
                        return False
                wait_first = delivered is None  # receive_now just found nothing
                while not http.request_bytes_waiting:
                    data = await fastio.receive_some(
                        self.stream, fastio.MAX_RECEIVE, wait_first=wait_first
                    )
                    wait_first = False
                    http.receive_data(data)
                    if not data or http.violation is not None:
                        break
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        finally:
            self.proxy.idle_waits.discard(scope)
        return not scope.cancelled_caught

    async def _read_request(self) -> Request | None:
        if self.requests and not await self._wait_for_request_bytes():
            return None
        deadline = self._first_head_deadline
        if deadline is None or self.requests:
            deadline = trio.current_time() + self.proxy.server.header_timeout
        try:
            event = await self._next_event(deadline)
        except _Timeout:
            raise RequestHeaderTimeout(
                f"request head not complete within {self.proxy.server.header_timeout:g}s"
            ) from None
        return event if isinstance(event, Request) else None  # else the client closed

    async def _request_body(self, limit: int) -> AsyncGenerator[bytes, None]:
        body_timeout = self.proxy.server.body_timeout or math.inf
        received = 0
        while True:
            try:
                event = await self._next_event(trio.current_time() + body_timeout)
            except _Timeout:
                self.response.close_after = True  # the answer says so: Connection: close
                raise RequestBodyTimeout(
                    f"request body stalled for {self.proxy.server.body_timeout:g}s"
                ) from None
            if type(event) is bytes:
                received += len(event)
                if limit and received > limit:
                    self.response.close_after = True
                    raise BodyTooLarge(f"request body over max_body_bytes ({limit})")
                yield event
            elif event is END:
                self._arm_watch()  # read whole: the watch owns the receive side now
                return
            else:
                raise ClientDisconnected("client closed the connection mid-body")

    def _request_head(self, request: Request) -> RequestHead:
        if request.method == b"CONNECT":
            raise ClientError("CONNECT is not supported by a reverse proxy", status=405)
        target, scheme, authority = request.target, self.scheme, request.authority or b""
        if target[:1] != b"/" and target != b"*":
            scheme, target, authority = _origin_form(target)
        # The codec's parser read the method, the target's bytes and the fields already.
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
            headers=request.headers,
            http_version=request.http_version,
            client_ip=self.client_ip,
            has_body=request.has_body,
            content_length=request.content_length,
            validated=True,
        )

    # -- the connection ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve requests until the client or a limit closes the connection."""
        self.proxy.connections_by_protocol["http/1.1"] += 1
        try:
            async with trio.open_nursery() as nursery:  # for the client watch
                self.watch.nursery = nursery
                try:
                    while await self._serve_one():
                        self.http.start_next_cycle()
                except ClientDisconnected:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self.proxy.connections_by_protocol["http/1.1"] -= 1
            with trio.move_on_after(fastio.CLOSE_TIMEOUT, shield=True):
                await self.stream.aclose()

    async def _serve_one(self) -> bool:
        """One request-response cycle; True if the connection can carry another."""
        now = trio.current_time()
        record = ExchangeRecord(start=now, wall_start=time.time(), client_ip=self.client_ip)
        try:
            request = await self._read_request()
            if request is None:
                return False
            # The exchange starts now, not when the wait for it began (an idle keep-alive
            # connection can wait minutes): the access log's time says when it came.
            record.start, record.wall_start = trio.current_time(), time.time()
            record.method, record.target = request.method, request.target
            record.protocol = b"HTTP/" + request.http_version
            head = self._request_head(request)
        except ProxyError as exc:
            await self._answer_and_close(exc, record)
            return False
        self.requests += 1
        server = self.proxy.server
        limit = server.max_requests_per_connection
        self.response.start(record, close_after=bool(limit and self.requests >= limit))
        if server.max_body_bytes and (head.content_length or 0) > server.max_body_bytes:
            await self._answer_and_close(
                BodyTooLarge(f"Content-Length over max_body_bytes ({server.max_body_bytes})"),
                record,
            )
            return False
        whole_body = request.whole_body
        upload = (
            self._request_body(server.max_body_bytes)
            if head.has_body and whole_body is None
            else None
        )
        upgrade = self.response if self._may_upgrade(head) else None
        exchange = Exchange(
            head=head,
            body=NO_BODY if upload is None else upload,
            whole_body=whole_body,
            sink=self.response,
            record=record,
            upgrade=upgrade,
            # A bodiless exchange watches the client only once it waits upstream (a connect,
            # or a wait that lasts the pool's WATCH_AFTER); one with a body, once the body is
            # read (_request_body), never while it is read; a tunnel reads the client itself.
            on_wait=self._arm_watch if upload is None and upgrade is None else None,
        )
        self.proxy.exchange_started()
        try:
            if upgrade is None:  # a tunnel reads the client itself
                self.watch.record = record
            await self.proxy.forwarder.forward(exchange)
        finally:
            self.watch.record = None
            self.proxy.exchange_finished(record)
            if upload is not None:
                await upload.aclose()  # one the exchange abandoned (413, early answer, cancel)
        return not self.watch.client_gone and self.http.reusable() and not self.proxy.draining

    def _arm_watch(self) -> None:
        """The exchange's request is read whole and it is about to wait for the upstream (or
        the pool): from now the watch owns the receive side. Idempotent."""
        if self.watch.record is None or self.http.request_bytes_waiting:
            return  # a tunnel, or the next request already here
        self.watch.arm()

    def _may_upgrade(self, head: RequestHead) -> bool:
        """A bodiless HTTP/1.1 request asking for a WebSocket that the codec holds as a switch
        proposal.

        Not when the client already sent bytes behind it that are not HTTP (it must wait for
        the 101, RFC 6455 4.1): the request goes up as an ordinary one, and those bytes are
        then answered 400 like any other violation, never tunneled with a gap in them.
        """
        return (
            not head.has_body
            and self.http.violation is None
            and self.http.upgrade_proposed
            and requested_upgrade(head.headers) is not None
        )

    async def _answer_and_close(self, exc: ProxyError, record: ExchangeRecord) -> None:
        """Answer an error found before any exchange started, then close the connection."""
        status, headers, body = error_response(exc)
        record.status, record.error = status, exc.proxy_status
        headers.append((b"connection", b"close"))
        try:
            data = self.http.send_refusal(status, headers, body)
            if data:
                await self.response.write(data)
        except (ClientDisconnected, Unwritable):
            return
        finally:
            self.proxy.observe(record)


def _origin_form(target: bytes) -> tuple[bytes, bytes, bytes]:
    """absolute-form (``http://host/path``) -> its scheme, origin-form and authority; the
    target's host wins over Host (RFC 9112 3.2.2). The request validation judges all three."""
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise ClientError("request target must be origin-form or absolute-form")
    host, slash, path = rest.partition(b"/")
    return scheme, (b"/" + path if slash else b"/"), host
