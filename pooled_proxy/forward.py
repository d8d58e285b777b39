"""forward(exchange): route -> pool checkout -> stream up -> stream down -> release or discard.

This is the only place proxy logic lives; the HTTP/1.1 and HTTP/2 front ends both call it.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable, Mapping

import trio

from .answers import error_response
from .config import Config, UpstreamConfig
from .errors import (
    ClientDisconnected,
    ConnectTimeout,
    DeadlineExceeded,
    HookError,
    NoRoute,
    ProxyError,
    ProxyInternalError,
    ReadTimeout,
    ResponseHeaderTimeout,
    StreamNotProcessed,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamUnavailable,
)
from .exchange import (
    ClientUpgrade,
    Exchange,
    ExchangeRecord,
    ExchangeTap,
    RequestHead,
    ResponseSink,
)
from .grpc import grpc_error_headers, grpc_timeout, grpc_timeout_value, is_grpc
from .headers import (
    Headers,
    client_response_headers,
    first_value,
    http_date,
    is_event_stream,
    upstream_request_headers,
)
from .log_limit import WarningLimiter
from .request_ids import choose_request_id
from .route_hooks import RouteHooks, load_route_hooks, run_hooks
from .routing import Router, rewrite_target
from .tunnel import (
    TunnelStats,
    requested_upgrade,
    run_tunnel,
    switched_response_headers,
    upgrade_request_headers,
)
from .upstream.api import ServerPool, UpstreamChannel
from .upstream.balancer import ServerHealth, UpstreamGroup
from .upstream.connection import ResponseHead, UpstreamConnection
from .upstream.pool import WATCH_AFTER, Connector

LOG = logging.getLogger("pooled_proxy.forward")


class _Upload:
    """Streams the client's request body upstream, one chunk at a time.

    The response-header clock starts when the last byte is sent, so a slow upload does not
    count against ``response_header_timeout``. A client-side failure (bad chunk, body timeout,
    size limit, disconnect) is kept in ``error`` and cancels the exchange.
    """

    def __init__(self, body: AsyncIterator[bytes], record: ExchangeRecord) -> None:
        self.body = body
        self.record = record
        # The client's body was asked for: no retry possible. Not only once a chunk came: a
        # read cancelled midway (the upstream failed while the client's bytes were on their
        # way) ends the body's iterator, and a retry would send the rest of nothing.
        self.started = False
        self.done = False
        self.error: ProxyError | None = None
        self.header_deadline = math.inf
        self.head_scope: trio.CancelScope | None = None
        self.sent_at: float | None = None  # when the last body byte went upstream

    def _start_header_clock(self, header_timeout: float) -> None:
        self.sent_at = trio.current_time()
        self.header_deadline = self.sent_at + header_timeout
        if self.head_scope is not None:
            self.head_scope.deadline = self.header_deadline

    async def run(
        self,
        connection: UpstreamChannel,
        header_timeout: float,
        exchange_scope: trio.CancelScope,
    ) -> None:
        self.started = True
        try:
            async for chunk in self.body:
                self.record.bytes_in += len(chunk)
                await connection.send_body(chunk)
            await connection.end_body()
        except UpstreamClosed:
            # The upstream may have answered early and closed (e.g. 413); the response side
            # reads that answer or reports the failure.
            self._start_header_clock(header_timeout)
            return
        except ProxyError as exc:
            self.error = exc
            exchange_scope.cancel()
            return
        self.done = True
        self._start_header_clock(header_timeout)


def _nothing_lost(sink: ResponseSink, upload: _Upload | None) -> bool:
    """The request can go again without anything of it or its answer lost: no response head
    has reached the client, and no byte of a streamed body has gone up."""
    return not sink.head_sent and (upload is None or not upload.started)


def _with_grpc_timeout(headers: Headers, seconds: float) -> Headers:
    """``headers`` with ``grpc-timeout`` set to ``seconds``."""
    value = grpc_timeout_value(seconds)
    return [(name, value if name == b"grpc-timeout" else field) for name, field in headers]


class _WholeResponse:
    """A response that arrived complete with its head, to be sent in one write.

    (A plain slotted class: a frozen dataclass's ``__init__`` costs a microsecond more.)
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class LiveCounts:
    """Gauges of exchanges in progress, shared by every forwarder generation (a reload hands
    it on), so an SSE stream that started before a reload counts until it ends."""

    __slots__ = ("event_streams", "tunnels")

    def __init__(self) -> None:
        self.event_streams = 0  # SSE responses whose head was sent and that are not over
        self.tunnels = 0  # WebSocket (upgraded) connections being relayed


class Forwarder:
    """Routes and upstream pools for one config generation."""

    def __init__(
        self,
        config: Config,
        *,
        connect: Connector | None = None,
        tap: ExchangeTap | None = None,
        upstreams: Mapping[str, UpstreamGroup] | None = None,
        tls: Mapping[str, ssl.SSLContext] | None = None,
        hooks: RouteHooks | None = None,
    ) -> None:
        """``upstreams``: groups carried over from the previous generation; ``tls``: the
        SSL context of each upstream with https:// servers, for the groups made here;
        ``tap``: sees every exchange (the inspector). Without one, an exchange pays for
        nothing but the tests of ``self.tap``; ``hooks``: the routes' hooks, imported here
        unless the caller already did."""
        self.config = config
        self.router = Router(config.routes)
        self.hooks = hooks if hooks is not None else load_route_hooks(config)
        self.upstreams: dict[str, UpstreamGroup] = dict(upstreams or {})
        tls = tls or {}
        for name, upstream_config in config.upstreams.items():
            if name not in self.upstreams:
                self.upstreams[name] = UpstreamGroup(
                    upstream_config, connect=connect, ssl_context=tls.get(name)
                )
        self.tap = tap
        server = config.server
        # The lower-case name of the request-ID field, or b"" when request IDs are off.
        self.request_id_header = server.request_id_header.encode() if server.request_id else b""
        self.stale_retries = 0
        self.live = LiveCounts()
        # One warning line per upstream server and error kind per second.
        self.warnings = WarningLimiter()

    async def run_reapers(self) -> None:
        async with trio.open_nursery() as nursery:
            for group in self.upstreams.values():
                nursery.start_soon(group.run_reapers)

    def close(self) -> None:
        for group in self.upstreams.values():
            group.close()

    async def forward(self, exchange: Exchange) -> None:
        """Serve one exchange completely: the client gets a response or an aborted stream."""
        record = exchange.record
        if self.tap is not None:
            exchange = self.tap.started(exchange)
        try:
            # Only HTTP/2 clients make gRPC calls: HTTP/1.1 requests skip the look.
            timeout = (
                grpc_timeout(exchange.head.headers) if exchange.head.http_version == b"2" else None
            )
            if timeout is None:
                await self._forward(exchange)
            else:
                with trio.CancelScope(deadline=record.start + timeout) as deadline:
                    await self._forward(exchange, deadline.deadline)
                if deadline.cancelled_caught:
                    raise DeadlineExceeded(f"grpc-timeout {timeout:g}s passed")
        except ClientDisconnected as exc:
            record.error = exc.proxy_status
        except ProxyError as exc:
            if self.request_id_header and not record.request_id:  # failed before it was set
                record.request_id = choose_request_id(
                    first_value(exchange.head.headers, self.request_id_header)
                )
            await self.answer_error(exchange.sink, record, exc)
        finally:
            if record.event_stream:
                self.live.event_streams -= 1

    async def answer_error(
        self, sink: ResponseSink, record: ExchangeRecord, exc: ProxyError
    ) -> None:
        record.error = exc.proxy_status
        if isinstance(exc, (UpstreamError, ProxyInternalError)):
            # A client's mistake is its answer and its access log line; an upstream's failure
            # (with its address, which the answer leaves out) and the proxy's own are logged.
            self._log_failure(record, exc)
        try:
            if sink.head_sent:
                await sink.reset(exc.reset_code)
                return
            status, headers, body = error_response(exc)
            if record.request_id:
                headers.append((self.request_id_header, record.request_id))
            if record.protocol == b"HTTP/2" and is_grpc(record.request_headers):
                # A gRPC client reads grpc-status, not a text 502 (see grpc.py).
                record.status = 200
                await sink.send_head(200, grpc_error_headers(exc, headers), end=True)
                return
            record.status = status
            if record.method == b"HEAD":
                # No body on a HEAD response (h11 refuses one, and the client reads none).
                await sink.send_head(status, headers, end=True)
                return
            await sink.send_head(status, headers, body=body, end=True)
        except ClientDisconnected:
            pass

    def _log_failure(self, record: ExchangeRecord, exc: ProxyError, then: str = "") -> None:
        """Log a failure of ``record.upstream_server`` (or of the proxy) once per server and
        kind a second: an outage fails every request alike. ``then``: what the proxy did
        about it, if it did not answer with it."""
        suppressed = self.warnings.admit(
            (record.upstream_server, exc.proxy_status), trio.current_time()
        )
        if suppressed is not None:
            LOG.log(
                logging.WARNING if exc.blame == "upstream" else logging.ERROR,
                "%s %s%s: %s%s%s",
                record.method.decode("latin-1"),
                record.target.decode("latin-1"),
                f" (request {record.request_id.decode('ascii')})" if record.request_id else "",
                exc.detail,
                then,
                f" ({suppressed} more like it since the last one, not logged)"
                if suppressed
                else "",
                exc_info=exc.__cause__ if isinstance(exc, HookError) else None,
            )

    def _next_server(
        self,
        group: UpstreamGroup,
        failed: tuple[ServerPool, ...],
        record: ExchangeRecord,
        exc: UpstreamError,
    ) -> tuple[ServerPool, ServerHealth] | None:
        """The server to try after the last of ``failed`` failed with ``exc`` before the
        request could have reached it or the client heard anything, or None when the
        upstream's ``server_tries`` are used up or no other server is up."""
        if len(failed) >= group.server_tries:
            return None
        try:
            choice = group.choose(exclude=failed)
        except UpstreamUnavailable:
            return None
        self._moving_on(record, exc, f"; trying {choice[0].server}")
        return choice

    def _moving_on(self, record: ExchangeRecord, exc: UpstreamError, then: str) -> None:
        """``record.upstream_server`` failed with ``exc`` and the request is sent again:
        logged, and listed in the access log and metrics."""
        self._log_failure(record, exc, then)
        record.servers_failed += ((record.upstream_server, exc.proxy_status),)

    async def _forward(self, exchange: Exchange, call_deadline: float | None = None) -> None:
        """``call_deadline``: when a gRPC call's ``grpc-timeout`` runs out."""
        head = exchange.head
        record = exchange.record
        record.request_headers = head.headers
        route = self.router.match(head.authority, head.path)
        if route is None:
            raise NoRoute(f"no route for host {head.authority.decode('latin-1')!r}")
        record.route = (route.host or "*") + route.path_prefix
        sink, upstream_name = exchange.sink, route.upstream
        if route.hooks:
            hooked = await run_hooks(
                self.hooks[route], exchange, upstream_name, self.upstreams, self.request_id_header
            )
            if hooked is None:
                return  # a hook answered
            head, upstream_name, sink = hooked
        group = self.upstreams[upstream_name]
        record.route_upstream = group.name
        target = rewrite_target(route, head.target)
        headers = upstream_request_headers(
            head.headers,
            host=head.authority,
            client_ip=head.client_ip,
            scheme=head.scheme,
            protocol=head.http_version,
            upstream_host=group.host_header,
            request_id_header=self.request_id_header,
        )
        if self.request_id_header:
            record.request_id = headers[-1][1]
        upgrade = requested_upgrade(head.headers) if exchange.upgrade is not None else None
        if upgrade is not None:
            # Hop-by-hop, but this hop must ask for the switch too (the front end vouched
            # that the client connection can be handed over).
            headers += upgrade_request_headers(upgrade)
        if head.has_body and head.content_length is None:
            # The client framed its body hop by hop (chunked, or h2 DATA frames) and that
            # framing was dropped; without a length h11 would frame the request as bodiless.
            headers.append((b"transfer-encoding", b"chunked"))
        whole_body = exchange.whole_body
        if whole_body is not None:
            record.bytes_in += len(whole_body)
        upload = _Upload(exchange.body, record) if head.has_body and whole_body is None else None
        # Can the request be sent again if the server closes the connection under it? Only
        # if no body byte went up, or the whole body is held here (one read of at most
        # 64 KiB, see Exchange.whole_body) and the method is idempotent. A streamed body
        # starts going up with the head, so it counts as sent.
        replayable = upload is None and (whole_body is None or head.idempotent)
        pool, health = group.choose()
        failed: tuple[ServerPool, ...] = ()  # servers this request left for another
        stale_retried = unprocessed_retried = fresh = False
        while True:
            record.upstream_server = str(pool.server)
            try:
                connection = None if fresh else pool.take_idle(replayable=replayable)
                if connection is not None:
                    reused = True
                else:
                    connection, reused = await pool.acquire(
                        replayable=replayable, on_wait=exchange.on_wait, fresh=fresh
                    )
            except (UpstreamConnectError, ConnectTimeout) as exc:
                # Nothing was sent: any request may go on to the next server.
                health.record_failure(trio.current_time(), exc)
                failed += (pool,)
                choice = self._next_server(group, failed, record, exc)
                if choice is None:
                    raise
                pool, health = choice
                continue
            record.upstream_reused = reused
            if not reused:
                record.connect_time = connection.connect_time
            if call_deadline is not None:
                # The upstream gets what is left of the call's time (the wait for a
                # connection and the connect took some), as the client would have sent it.
                headers = _with_grpc_timeout(headers, call_deadline - trio.current_time())
            if self.tap is not None:
                self.tap.upstream_request(record, target, headers, connection.http_version)
            try:
                whole = await self._exchange(
                    connection,
                    group.config,
                    head,
                    target,
                    headers,
                    upload,
                    sink,
                    record,
                    upgrade=exchange.upgrade if upgrade is not None else None,
                    whole_body=whole_body,
                    on_wait=exchange.on_wait,
                )
            except StreamNotProcessed:
                # An HTTP/2 server did not process it (GOAWAY, REFUSED_STREAM): whatever its
                # method, it may be sent again, once, if nothing of it is lost (RFC 9113 8.7).
                pool.release(connection, reusable=False)
                if not unprocessed_retried and _nothing_lost(sink, upload):
                    unprocessed_retried = True
                    record.retried = True
                    LOG.debug("%s did not process the request, sending it again", pool.server)
                    continue
                raise
            except UpstreamClosed as exc:
                # Closed or reset with nothing of the response received: sending the request
                # again is safe if nothing of its body went up, or the body is held and the
                # method idempotent.
                unanswered = connection.received_bytes == 0 and not sink.head_sent
                resendable = unanswered and (
                    replayable or (upload is not None and not upload.started)
                )
                # The keep-alive race: the upstream closed this idle connection just as we
                # reused it, within RACE of the request (the pool learns the server's idle
                # timeout from it). A later close is the server failing on the request.
                race = reused and unanswered and pool.closed_under_us(connection)
                pool.release(connection, reusable=False)
                if race and resendable and not stale_retried:
                    # Not the server's fault: once, on a fresh connection.
                    stale_retried = True
                    self.stale_retries += 1
                    record.retried = True
                    LOG.debug("stale connection to %s, retrying on a new one", pool.server)
                    pool, health = group.choose(exclude=failed)
                    continue
                health.record_failure(trio.current_time(), exc)
                if resendable and not race:
                    # A connection the server dropped with the request: it failed.
                    choice = self._next_server(group, (*failed, pool), record, exc)
                    if choice is not None:
                        failed += (pool,)
                        pool, health = choice
                        continue
                    if reused and not fresh and len(group.pools) == 1:
                        # Its only server gets it again on a new connection, as the race
                        # would: the closed one may have been all that was wrong.
                        fresh = True
                        self._moving_on(record, exc, "; trying it on a new connection")
                        continue
                raise
            except UpstreamConnectError as exc:
                # Raised by the exchange, not the connect: a TLS 1.3 server refuses our client
                # certificate (or its absence) after the handshake looked complete to us, and
                # the first read of the new connection finds its alert. Nothing was processed:
                # as for a failed connect, the request goes on if nothing of it is lost.
                pool.release(connection, reusable=False)
                health.record_failure(trio.current_time(), exc)
                if not reused and connection.received_bytes == 0 and _nothing_lost(sink, upload):
                    failed += (pool,)
                    choice = self._next_server(group, failed, record, exc)
                    if choice is not None:
                        pool, health = choice
                        continue
                raise
            except UpstreamError as exc:
                # An invalid response or a timeout is the server failing too (passive health),
                # not only a refused or reset connection.
                pool.release(connection, reusable=False)
                health.record_failure(trio.current_time(), exc)
                raise
            except BaseException:
                pool.release(connection, reusable=False)
                raise
            if connection.upgraded:
                # A tunnel ran and has closed both streams: nothing left to send, and the
                # connection spoke another protocol, so it is never pooled again.
                pool.release(connection, reusable=False, close_reason="upgraded")
                health.record_success()
                return
            # The upstream's part is complete: free its connection before flushing the
            # end of the response (or all of it) to a client that may be slow.
            trailers = connection.trailers
            pool.release(connection, reusable=upload is None or upload.done)
            health.record_success()
            if whole is not None:
                await sink.send_head(whole.status, whole.headers, body=whole.body, end=True)
            else:
                await sink.end(trailers or None)
            return

    async def _exchange(
        self,
        connection: UpstreamChannel,
        upstream: UpstreamConfig,
        head: RequestHead,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        upload: _Upload | None,
        sink: ResponseSink,
        record: ExchangeRecord,
        *,
        upgrade: ClientUpgrade | None = None,
        whole_body: bytes | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> _WholeResponse | None:
        """Send the request and relay the response; see ``_relay_response`` for what it returns.

        A request without a body, or whose ``whole_body`` is at hand, goes up in one write.
        """
        header_timeout = upstream.response_header_timeout or math.inf
        if upload is None:
            await connection.send_request(
                head.method,
                target,
                headers,
                end=True,
                body=whole_body or b"",
                # (The headers the proxy adds are built from validated values.)
                valid_syntax=head.validated,
            )
            sent_at = trio.current_time()
            return await self._relay_response(
                connection,
                upstream,
                None,
                sent_at + header_timeout,
                sink,
                record,
                sent_at=sent_at,
                upgrade=upgrade,
                on_wait=on_wait,
            )
        await connection.send_request(head.method, target, headers, end=False)
        head_sent_at = trio.current_time()
        relay_error: ProxyError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload.run, connection, header_timeout, nursery.cancel_scope)
            try:
                await self._relay_response(
                    connection, upstream, upload, math.inf, sink, record, sent_at=head_sent_at
                )
            except ProxyError as exc:
                relay_error = exc
            # Done (or failed); a body still uploading means the upstream answered early, so
            # the connection cannot be reused (release sees upload.done False).
            nursery.cancel_scope.cancel()
        if upload.error is not None:
            raise upload.error
        if relay_error is not None:
            raise relay_error
        return None

    async def _response_head(
        self,
        connection: UpstreamChannel,
        deadline: float,
        on_wait: Callable[[], None] | None,
    ) -> ResponseHead:
        """The connection's next response head; ``trio.TooSlowError`` at ``deadline``.

        ``on_wait`` is called once the head has been waited for ``WATCH_AFTER``: most come
        sooner, and a short wait is not worth watching the client for (a watch task woken to
        watch, then woken again to hand over the next request: two task steps), as in the
        pool's queue.

        The head is looked for at once, without a checkpoint: the request's write ended with
        a yield, in which the upstream usually answered, and a second trip through the
        scheduler after the read would only let the other tasks run once more.
        """
        if not connection.response_at_hand() and on_wait is not None:
            watch_at = trio.current_time() + WATCH_AFTER
            if watch_at < deadline:
                try:
                    return await connection.receive_response_head(watch_at)
                except trio.TooSlowError:
                    on_wait()
        return await connection.receive_response_head(deadline)

    async def _relay_response(
        self,
        connection: UpstreamChannel,
        upstream: UpstreamConfig,
        upload: _Upload | None,
        header_deadline: float,
        sink: ResponseSink,
        record: ExchangeRecord,
        *,
        sent_at: float | None = None,
        upgrade: ClientUpgrade | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> _WholeResponse | None:
        """Relay the response head and body to ``sink``; the end is left to the caller.

        Returns the whole response instead, unsent, when it arrived complete with its head
        (most small responses do) and no request body is still on its way: the caller sends
        it in one write once the upstream connection is back in the pool.

        ``on_wait`` (the exchange's) is called once the relay has waited ``WATCH_AFTER`` for
        the response head (see ``_response_head``), or for the rest of the body.
        """
        while True:
            timed_out = False
            if upload is None:
                # The deadline is fixed: the connection only sets a timer if it has to wait.
                try:
                    response = await self._response_head(connection, header_deadline, on_wait)
                except trio.TooSlowError:
                    timed_out = True
            else:
                # The upload moves the deadline when its last byte goes out: a cancel scope.
                head_scope = upload.head_scope = trio.CancelScope(deadline=upload.header_deadline)
                with head_scope:
                    response = await connection.receive_response_head()
                timed_out = head_scope.cancelled_caught
            if timed_out:
                connection.close()
                raise ResponseHeaderTimeout(
                    f"no response head from {connection.server} within "
                    f"{upstream.response_header_timeout:g}s"
                )
            if not response.informational:
                break
            if (
                response.status_code == 101
                and upgrade is not None
                and isinstance(connection, UpstreamConnection)  # HTTP/2 has no 101
            ):
                await self._tunnel(connection, upstream, response, upgrade, record)
                return None
            if response.status_code == 100:
                await sink.send_informational(100, [])

        if self.tap is not None:
            self.tap.upstream_response(record, response.status_code, response.headers)
        record.status = response.status_code
        now = trio.current_time()
        record.ttfb = now - record.start
        if upload is not None and upload.sent_at is not None:
            sent_at = upload.sent_at  # else the upstream answered before the body was all sent
        if sent_at is not None:
            record.upstream_header_time = now - sent_at
        response_headers = client_response_headers(
            response.headers,
            protocol=connection.http_version,
            date=http_date,
            request_id=(self.request_id_header, record.request_id) if record.request_id else None,
        )
        record.event_stream = is_event_stream(response_headers)
        if record.event_stream:
            self.live.event_streams += 1  # until forward() finishes the exchange
        body, ended = connection.buffered_body()
        if ended and upload is None and not connection.trailers:
            return _WholeResponse(response.status_code, response_headers, body)
        await sink.send_head(response.status_code, response_headers, body=body)

        read_timeout = upstream.read_timeout or math.inf
        # As for the head: the client is watched once the rest of the body has taken
        # WATCH_AFTER, so a response relayed sooner needs no watch.
        watch_at = math.inf
        if not ended and on_wait is not None:
            watch_at = trio.current_time() + WATCH_AFTER
        # A deadline handed down, as for the head: a timer only when a read must wait.
        deadline = trio.current_time() + read_timeout
        while not ended:
            try:
                chunk = await connection.receive_data(min(deadline, watch_at))
            except trio.TooSlowError:
                if watch_at < deadline:
                    assert on_wait is not None
                    on_wait()
                    watch_at = math.inf
                    continue
                connection.close()
                raise ReadTimeout(
                    f"{connection.server} sent nothing for {upstream.read_timeout:g}s mid-body"
                ) from None
            if chunk is None:
                break
            # Whatever arrived with it (more chunks, the end) goes out in the same write.
            more, ended = connection.buffered_body()
            if more:
                chunk += more
            await sink.send_data(chunk)
            deadline = trio.current_time() + read_timeout
        return None

    async def _tunnel(
        self,
        connection: UpstreamConnection,
        upstream: UpstreamConfig,
        response: ResponseHead,
        upgrade: ClientUpgrade,
        record: ExchangeRecord,
    ) -> None:
        """After the upstream's 101: relay it, then copy raw bytes both ways until it ends."""
        if self.tap is not None:
            self.tap.upstream_response(record, 101, response.headers)
        record.status = 101
        record.ttfb = trio.current_time() - record.start
        upstream_stream, upstream_data = connection.detach()
        client_stream, client_data = await upgrade.switch_protocols(
            switched_response_headers(response.headers)
        )
        stats = TunnelStats()
        self.live.tunnels += 1
        try:
            await run_tunnel(
                client_stream,
                upstream_stream,
                client_data=client_data,
                upstream_data=upstream_data,
                idle_timeout=upstream.read_timeout or math.inf,
                stats=stats,
            )
        finally:  # cancelled too (drain deadline): the access log still gets the figures
            self.live.tunnels -= 1
            record.bytes_in += stats.bytes_up
            record.bytes_out += stats.bytes_down
            record.extra["tunnel_closed_by"] = stats.closed_by
