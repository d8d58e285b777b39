"""The HTTP/2 front end: one h2 connection per client, reused stream workers, flow control both ways.

Shape (hypercorn's, with the proxy's needs added):

- one **reader** (the connection task itself) feeds the client's bytes to a
  :class:`~pooled_proxy.protocol.h2_server.FrameGuard` and to h2, and turns h2 events into
  stream work;
- one **writer** task owns the socket's send side. Stream workers never write to the socket:
  they put bytes in their stream's small buffer, and the writer sends DATA frames round-robin,
  each at most ``min(flow-control window, max frame size)``. A stream's ``send_data`` returns
  only once its buffer is down to ``STREAM_LOW_WATER``, so a client that does not open its
  window stops the forwarder reading from that stream's upstream: backpressure, never an
  unbounded buffer;
- **stream workers** in the connection's nursery each run one stream at a time through
  ``forwarder.forward(Exchange)``, the same path HTTP/1.1 uses, with the stream as its
  ``ResponseSink``; a worker whose stream is over waits for the connection's next one (a new
  stream starts a new worker only when none is free), and a reset cancels only the scope of
  the worker serving that stream;
- request bodies are credited back to the client (WINDOW_UPDATE) only after the forwarder has
  sent a chunk upstream, so a slow upstream slows the client down too.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import outcome
import trio
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .. import fastio
from ..errors import (
    BodyTooLarge,
    ClientDisconnected,
    ProxyError,
    RequestBodyTimeout,
)
from ..exchange import NO_BODY, Exchange, ExchangeRecord
from ..headers import Headers, h1_response_to_h2, trailer_fields
from ..protocol.h2_server import (
    AbuseLimits,
    FrameGuard,
    H2Abuse,
    HeaderBlockRefused,
    PlainLiteralEncoder,
    check_header_blocks,
    never_indexed,
    request_head,
)
from ..proxy import Proxy

LOG = logging.getLogger("pooled_proxy.http2")

# send_data returns once its stream has at most this much unsent: the writer keeps a frame's
# worth to send while the forwarder reads the next upstream chunk, and never more than about
# one flow-control window (this plus one upstream read) sits in the proxy per stream.
STREAM_LOW_WATER = 16 * 1024
WRITE_BATCH = 64 * 1024  # the writer gathers up to this much before one send_all
# Frames h2 wrote on its own (SETTINGS/PING ACKs, WINDOW_UPDATEs, HEADERS) that the client has
# not taken yet: over this, we stop reading from it until it does.
OUTBOX_PAUSE = 256 * 1024
# A lingering close (after the last stream of a GOAWAY ended) waits for the client's EOF at
# most this long in all, and gives up sooner on a client silent for fastio.CLOSE_TIMEOUT.
LINGER_TIME = 30.0
DEFAULT_WINDOW = 65535
# Stream workers a connection keeps waiting for its next streams (a burst of more concurrent
# streams starts more; those over this number end when their stream does).
IDLE_WORKERS = 16
REQUEST_ID_INDEXED_EVERY = 64
SETTING = h2.settings.SettingCodes


class _StreamGone(Exception):
    """The stream was reset or its connection closed while a task was using it."""


class H2Stream:
    """One request/response exchange on the connection; the forwarder's ``ResponseSink``."""

    def __init__(self, connection: HTTP2Connection, stream_id: int, record: ExchangeRecord) -> None:
        self.connection = connection
        self.id = stream_id
        self.record = record
        # The cancel scope of the worker serving the stream, while one does; ``cancel()``
        # before that marks it for cancelling once a worker takes it.
        self.scope: trio.CancelScope | None = None
        self.cancelled = False
        self.head_sent = False
        # request body, filled by the reader
        self.inbound: deque[tuple[bytes, int]] = deque()
        self.unacknowledged = 0  # flow-controlled bytes received and not yet credited back
        self.request_ended = False
        # Events are made only when someone waits (most streams never do).
        self._body_arrived: trio.Event | None = None
        # response, drained by the writer
        self.outbound = bytearray()
        self.end_requested = False
        self.trailers: Headers | None = None
        self.ended = False  # END_STREAM is queued for the client
        self.closed = False  # reset by either side, or the connection is going away
        self._progress: trio.Event | None = None

    # -- reader side -----------------------------------------------------------------------

    def data_received(self, data: bytes, flow_controlled_length: int) -> None:
        self.unacknowledged += flow_controlled_length
        self.inbound.append((data, flow_controlled_length))
        if self._body_arrived is not None:
            self._body_arrived.set()

    def request_complete(self) -> None:
        self.request_ended = True
        if self._body_arrived is not None:
            self._body_arrived.set()

    def close(self) -> None:
        """No more I/O on this stream: wake whoever waits on it."""
        self.closed = True
        self.outbound.clear()
        if self._body_arrived is not None:
            self._body_arrived.set()
        if self._progress is not None:
            self._progress.set()

    def cancel(self) -> None:
        """Stop the stream's work (its forwarder) at its next checkpoint."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()

    def whole_request_body(self) -> bytes | None:
        """The request's whole body if all of it arrived before the stream's task ran (a
        small upload: its DATA and END_STREAM came with its HEADERS), credited back to the
        client's window; else ``None``, and the body streams through ``request_body``."""
        if not self.request_ended or self.closed:
            return None
        limit = self.connection.proxy.server.max_body_bytes
        body = b"".join([data for data, _ in self.inbound])
        if limit and len(body) > limit:
            return None  # request_body answers it
        self.connection.credit(self, sum(length for _, length in self.inbound))
        self.inbound.clear()
        return body

    async def request_body(self) -> AsyncGenerator[bytes, None]:
        server = self.connection.proxy.server
        limit = server.max_body_bytes
        body_timeout = server.body_timeout or math.inf
        received = 0
        while True:
            while not self.inbound and not self.request_ended and not self.closed:
                arrived = self._body_arrived = trio.Event()
                with trio.move_on_after(body_timeout) as waited:
                    await arrived.wait()
                if waited.cancelled_caught:
                    raise RequestBodyTimeout(f"request body stalled for {server.body_timeout:g}s")
            if self.closed:
                raise ClientDisconnected("client reset the stream mid-body")
            if not self.inbound:
                return
            data, flow_controlled_length = self.inbound.popleft()
            received += len(data)
            if limit and received > limit:
                raise BodyTooLarge(f"request body over max_body_bytes ({limit})")
            if data:
                yield data
            # The forwarder asked for the next chunk, so this one went upstream: only now
            # may the client send more in its place.
            self.connection.credit(self, flow_controlled_length)

    # -- the ResponseSink protocol ---------------------------------------------------------

    async def send_informational(self, status: int, headers: Headers) -> None:
        if status == 100:
            self.connection.send_headers(self, [(b":status", b"100")], end=False)
        await trio.lowlevel.checkpoint()

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        connection = self.connection
        block = h1_response_to_h2(status, headers)
        if self.record.request_id:
            connection.responses_with_id += 1
            # Now and then one goes indexed, so that the others can name the field by its
            # place in the client's table instead of spelling it out.
            if connection.responses_with_id % REQUEST_ID_INDEXED_EVERY != 1:
                never_indexed(block, connection.proxy.forwarder.request_id_header)
        connection.send_headers(self, block, end=end and not body, pull=not body)
        self.head_sent = True
        if not body:
            if end:
                self.end_requested = self.ended = True
                # The exchange is over and its task about to end: no checkpoint (a trip
                # through the scheduler) for nothing.
                return
            await trio.lowlevel.checkpoint()
            return
        if connection.send_now(self, body, end=end):
            # Most responses: HEADERS, DATA and END_STREAM leave in the same write.
            if not end:
                await trio.lowlevel.checkpoint()
            return
        connection._pull()
        # The body (and the end) queue behind the head, for the writer to send as the
        # client's window allows: one wait instead of one per send_data() and end().
        self.outbound += body
        self.end_requested = end
        self.connection.schedule(self)
        await self._wait_for(
            (lambda: self.ended) if end else (lambda: len(self.outbound) <= STREAM_LOW_WATER)
        )

    async def send_data(self, data: bytes) -> None:
        if self.closed:
            raise ClientDisconnected("client reset the stream")
        if data and self.connection.send_now(self, data, end=False):
            await trio.lowlevel.checkpoint()
            return
        if data:
            self.outbound += data
            self.connection.schedule(self)
        await self._wait_for(lambda: len(self.outbound) <= STREAM_LOW_WATER)

    async def end(self, trailers: Headers | None = None) -> None:
        if self.ended:
            return
        if trailers:
            self.trailers = trailer_fields(trailers)
        elif self.connection.send_now(self, b"", end=True):
            return  # the exchange is over: no checkpoint for nothing (see send_head)
        self.end_requested = True
        self.connection.schedule(self)
        await self._wait_for(lambda: self.ended)

    async def reset(self, error_code: int = ErrorCodes.INTERNAL_ERROR) -> None:
        self.connection.reset(self, error_code)
        await trio.lowlevel.checkpoint()

    async def _wait_for(self, done: Callable[[], bool]) -> None:
        if done() or self.closed:
            # Nothing to wait for: no timer (a cancel scope costs ~5 us).
            if self.closed:
                raise ClientDisconnected("client reset the stream")
            await trio.lowlevel.checkpoint()
            return
        write_timeout = self.connection.proxy.server.write_timeout or math.inf
        with trio.move_on_after(write_timeout) as waited:
            while not done() and not self.closed:
                progress = self._progress = trio.Event()
                await progress.wait()
        if self.closed:
            raise ClientDisconnected("client reset the stream")
        if waited.cancelled_caught:
            self.connection.reset(self, ErrorCodes.CANCEL)
            raise ClientDisconnected(f"client did not read for {write_timeout:g}s")
        await trio.lowlevel.checkpoint()

    def progressed(self) -> None:
        if self._progress is not None:
            self._progress.set()


# A stream for a worker: the stream, its request's header block, and whether END_STREAM came
# with it.
_Job = tuple[H2Stream, Headers, bool]


class HTTP2Connection:
    """Serves one HTTP/2 client connection until it closes, fails, idles out or drains."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        proxy: Proxy,
        *,
        client_ip: bytes,
        scheme: bytes,
        initial_data: bytes = b"",
        limits: AbuseLimits | None = None,
    ) -> None:
        self.stream = stream
        self.proxy = proxy
        self.client_ip = client_ip
        self.scheme = scheme
        self.initial_data = initial_data
        server = proxy.server
        self.max_streams = server.max_concurrent_streams
        self.guard = FrameGuard(
            limits
            or AbuseLimits.for_server(
                max_concurrent_streams=server.max_concurrent_streams,
                max_header_bytes=server.max_header_bytes,
            )
        )
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # What we send is already valid: h1_response_to_h2 lower-cases the names and
                # drops connection-specific ones, and the values passed the HTTP/1.1 checks
                # on their way in.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                # What we receive gets h2's checks from check_header_blocks, one pass for an
                # ordinary request; request_head joins cookie crumbs.
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self.h2.encoder = PlainLiteralEncoder()
        self.streams: dict[int, H2Stream] = {}
        self.streams_started = 0
        self.responses_with_id = 0  # response header blocks with a request ID sent
        self._idle_workers: list[trio.lowlevel.Task] = []
        self._sending: dict[H2Stream, None] = {}  # streams with DATA or an end to send, in turn
        self._outbox = bytearray()
        self._writer_wakeup = trio.Event()
        self._sent = trio.Event()
        self._writer_done = trio.Event()
        self._closing = False  # the writer flushes what is left and stops
        self._flushed = False  # ... and it did: everything queued reached the socket
        self.goaway_sent = False
        self.last_stream_id = 0
        self._idle_since = trio.current_time()
        self._read_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    # -- set-up ----------------------------------------------------------------------------

    def _initiate(self) -> None:
        server = self.proxy.server
        advertised = {
            SETTING.MAX_CONCURRENT_STREAMS: self.max_streams,
            SETTING.MAX_HEADER_LIST_SIZE: server.max_header_bytes,
            SETTING.INITIAL_WINDOW_SIZE: DEFAULT_WINDOW,
        }
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=advertised)
        self.h2.decoder.max_header_list_size = server.max_header_bytes
        self.h2.initiate_connection()
        # h2 treats a stream over MAX_CONCURRENT_STREAMS as a connection error; RFC 9113
        # section 5.1.2 lets us refuse just that stream, which is kinder to a client whose
        # SETTINGS ACK is still in flight. So h2's own limit is lifted once the advertised
        # one is on the wire, and _stream_opened enforces it with REFUSED_STREAM.
        self.h2.local_settings = h2.settings.Settings(
            client=False, initial_values={**advertised, SETTING.MAX_CONCURRENT_STREAMS: 2**31 - 1}
        )
        # The connection window starts at 64 KiB for all streams together; give each
        # stream its own window's worth, so one slow upload cannot starve the others.
        extra = DEFAULT_WINDOW * (self.max_streams - 1)
        if extra > 0:
            self.h2.increment_flow_control_window(min(extra, 2**31 - 1 - DEFAULT_WINDOW))
        self._pull()

    # -- the connection ----------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._initiate()
                nursery.start_soon(self._writer)
                nursery.start_soon(self._watch_drain)
                try:
                    await self._read_loop()
                finally:
                    self._shut_streams()
                # Let the writer flush the last frames (GOAWAY, final DATA) for a moment.
                self._closing = True
                self._wake_writer()
                with trio.move_on_after(fastio.CLOSE_TIMEOUT):
                    await self._writer_done.wait()
                nursery.cancel_scope.cancel()
            if self._finished() and self._flushed:
                await self._linger()
        finally:
            with trio.move_on_after(fastio.CLOSE_TIMEOUT, shield=True):
                await self.stream.aclose()

    async def _linger(self) -> None:
        """The last stream after a GOAWAY has ended: half-close, then read (and drop) what
        the client still sends until it closes too.

        The client goes on sending WINDOW_UPDATEs while it takes the last DATA frames, and
        closing a socket with unread bytes in it makes the kernel reset the connection,
        which throws away the tail of the response still in the socket's send buffer.
        """
        stream = self.stream
        with trio.move_on_after(LINGER_TIME):
            try:
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while True:
                    with trio.move_on_after(fastio.CLOSE_TIMEOUT) as quiet:
                        data = await stream.receive_some(fastio.MAX_RECEIVE)
                    if quiet.cancelled_caught or not data:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _shut_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.close()
            stream.cancel()

    async def _read_loop(self) -> None:
        data = self.initial_data
        while True:
            if data and not self._receive(data):
                return
            if self._finished():
                return
            while len(self._outbox) > OUTBOX_PAUSE:
                self._sent = trio.Event()
                await self._sent.wait()
            scope = self._read_scope = trio.CancelScope(deadline=self._read_deadline())
            try:
                with scope:
                    data = await fastio.receive_some(self.stream, fastio.MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return
            finally:
                self._read_scope = None
            if scope.cancelled_caught:
                if self._finished():
                    return
                self._timed_out()
                return
            if not data:
                return

    def _receive(self, data: bytes) -> bool:
        """Feed bytes from the client; False when the connection must close."""
        now = trio.current_time()
        highest_stream_id = self.h2.highest_inbound_stream_id
        try:
            self.guard.feed(data, now)
            events = self.h2.receive_data(data)
            check_header_blocks(events, highest_stream_id)
        except HeaderBlockRefused as refused:
            # As when h2's own checks refuse a block: nothing of this read is served.
            LOG.info("HTTP/2 protocol error from %s: %s", self.client_ip.decode(), refused.error)
            try:
                self.h2.close_connection(
                    ErrorCodes.PROTOCOL_ERROR, last_stream_id=refused.last_stream_id
                )
            except h2.exceptions.ProtocolError:
                pass  # closed already (the client's GOAWAY came in the same read)
            self._pull()
            return False
        except H2Abuse as exc:
            LOG.warning("HTTP/2 client %s: %s; closing", self.client_ip.decode(), exc)
            self._goaway_and_close(ErrorCodes.ENHANCE_YOUR_CALM, str(exc))
            return False
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY with the right error code already.
            LOG.info("HTTP/2 protocol error from %s: %s", self.client_ip.decode(), exc)
            self._pull()
            return False
        try:
            for event in events:
                if not self._handle(event, now):
                    return False
        except H2Abuse as exc:
            LOG.warning("HTTP/2 client %s: %s; closing", self.client_ip.decode(), exc)
            self._goaway_and_close(ErrorCodes.ENHANCE_YOUR_CALM, str(exc))
            return False
        finally:
            self._pull()  # ACKs, WINDOW_UPDATEs and RST_STREAMs h2 wrote for these events
        return True

    def _handle(self, event: h2.events.Event, now: float) -> bool:
        if isinstance(event, h2.events.RequestReceived):
            self._stream_opened(event, now)
        elif isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None and event.flow_controlled_length is not None
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.closed:
                stream.data_received(event.data or b"", event.flow_controlled_length)
            elif event.flow_controlled_length:
                # Nobody will read it: hand the window straight back.
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.request_complete()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                if not stream.ended:
                    stream.record.error = ClientDisconnected.proxy_status
                stream.close()
                # Cancelling forward() closes the upstream connection instead of pooling it.
                stream.cancel()
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._wake_writer()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 accepts nothing more after a GOAWAY, in-flight streams included.
            return False
        return True

    def _stream_opened(self, event: h2.events.RequestReceived, now: float) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        # Counted here, not with h2's open_inbound_streams: h2 has already opened every
        # stream of the bytes just read, so its count runs ahead of the one being decided.
        if self.goaway_sent or (
            len(self.streams) >= self.max_streams
            and sum(1 for s in self.streams.values() if not (s.ended or s.closed))
            >= self.max_streams
        ):
            self.guard.note_refused(now)
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.last_stream_id = stream_id
        record = ExchangeRecord(
            start=now, wall_start=time.time(), client_ip=self.client_ip, protocol=b"HTTP/2"
        )
        stream = H2Stream(self, stream_id, record)
        # Whether the request has a body is decided by this HEADERS frame alone: its DATA
        # and END_STREAM may be in the same read and reach the stream before its task runs.
        bodiless = event.stream_ended is not None
        if bodiless:
            stream.request_ended = True
        self.streams[stream_id] = stream
        self.streams_started += 1
        job = (stream, event.headers or [], bodiless)
        if self._idle_workers:
            trio.lowlevel.reschedule(self._idle_workers.pop(), outcome.Value(job))
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._stream_worker, job)
        limit = self.proxy.server.max_requests_per_connection
        if limit and self.streams_started >= limit:
            self._start_goaway()

    async def _stream_worker(self, job: _Job | None) -> None:
        """Serve streams one after another: ``job``, then whatever ``_stream_opened`` hands
        over while this task waits among the idle workers.

        A task and a cancel scope for every stream cost more than a stream's own work in the
        front end; a connection's workers are reused from one request to the next, and a
        worker's cancel scope is replaced only after it was used to stop a stream (a reset).
        """
        while job is not None:
            with trio.CancelScope() as scope:
                while job is not None:
                    job[0].scope = scope
                    if job[0].cancelled:  # reset before this worker took it
                        scope.cancel()
                    await self._run_stream(*job)
                    job[0].scope = None
                    # Nothing of a finished exchange is held while waiting for the next.
                    job = None
                    # Once a reset has cancelled this scope, the wait raises Cancelled at
                    # once: the next stream gets a new scope.
                    job = await self._next_job()
            if scope.cancelled_caught:
                job = None
                job = await self._next_job()

    async def _next_job(self) -> _Job | None:
        """Wait among the idle workers for the next stream; ``None`` if enough wait already
        (the worker ends)."""
        if len(self._idle_workers) >= IDLE_WORKERS:
            return None
        task = trio.lowlevel.current_task()
        self._idle_workers.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._idle_workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        job: _Job = await trio.lowlevel.wait_task_rescheduled(abort)
        return job

    async def _run_stream(self, stream: H2Stream, header_block: Headers, bodiless: bool) -> None:
        proxy = self.proxy
        forwarder = proxy.forwarder
        record = stream.record
        proxy.exchange_started()
        try:
            try:
                head = request_head(
                    header_block,
                    end_stream=bodiless,
                    scheme=self.scheme,
                    client_ip=self.client_ip,
                    max_header_count=proxy.server.max_header_count,
                )
                record.method, record.target = head.method, head.target
                limit = proxy.server.max_body_bytes
                if limit and (head.content_length or 0) > limit:
                    raise BodyTooLarge(f"Content-Length over max_body_bytes ({limit})")
            except ProxyError as exc:
                for name, value in header_block:  # for the log, whatever was refused
                    if name == b":method":
                        record.method = value
                    elif name == b":path":
                        record.target = value
                await forwarder.answer_error(stream, record, exc)
                return  # observed by exchange_finished(), as a forwarded one is
            if not head.has_body:
                await forwarder.forward(
                    Exchange(head=head, body=NO_BODY, sink=stream, record=record)
                )
                return
            whole_body = stream.whole_request_body()
            if whole_body is not None:
                if head.content_length is None:
                    # Framed upstream by its length, as it is all here (h2 checked a
                    # content-length the client sent against its DATA).
                    head.content_length = len(whole_body)
                    head.headers.append((b"content-length", b"%d" % len(whole_body)))
                await forwarder.forward(
                    Exchange(
                        head=head,
                        body=NO_BODY,
                        sink=stream,
                        record=record,
                        whole_body=whole_body,
                    )
                )
                return
            body = stream.request_body()
            try:
                exchange = Exchange(head=head, body=body, sink=stream, record=record)
                await forwarder.forward(exchange)
            finally:
                # The forwarder may stop mid-body (an early answer, a reset): close the
                # generator now rather than leave it to the garbage collector.
                with trio.CancelScope(shield=True):
                    await body.aclose()
        except Exception:
            # A bug in one exchange must not take the connection's other streams down;
            # _stream_done resets this one.
            LOG.exception(
                "HTTP/2 stream %d from %s failed%s",
                stream.id,
                self.client_ip.decode(),
                f" (request {record.request_id.decode('ascii')})" if record.request_id else "",
            )
        finally:
            proxy.exchange_finished(record)
            self._stream_done(stream)

    def _stream_done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)
        self._sending.pop(stream, None)
        if not stream.closed:
            if not stream.ended:
                # The response is incomplete (the forwarder gave up mid-way): tell the client.
                self.reset(stream, ErrorCodes.INTERNAL_ERROR)
            elif not stream.request_ended:
                # Answered before the client finished its body (a 413, say): it may stop
                # sending (RFC 9113 section 8.1).
                self.reset(stream, ErrorCodes.NO_ERROR)
            stream.close()
        if stream.unacknowledged:
            # Body the forwarder never took still holds the connection window.
            try:
                self.h2.acknowledge_received_data(stream.unacknowledged, stream.id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing anyway
            stream.unacknowledged = 0
        self._pull()
        if not self.streams:
            self._idle_since = trio.current_time()
            if self._read_scope is not None:
                if self._finished():
                    self._read_scope.cancel()
                else:
                    self._read_scope.deadline = self._read_deadline()

    # -- timeouts and closing ------------------------------------------------------------

    def _read_deadline(self) -> float:
        server = self.proxy.server
        deadline = math.inf
        if not self.streams:
            deadline = self._idle_since + server.keepalive_timeout
        if self.guard.header_block_since is not None:
            deadline = min(deadline, self.guard.header_block_since + server.header_timeout)
        return deadline

    def _timed_out(self) -> None:
        if self.guard.header_block_since is not None:
            LOG.info("HTTP/2 client %s: header block not complete in time", self.client_ip.decode())
            self._goaway_and_close(ErrorCodes.PROTOCOL_ERROR, "header timeout")
        else:
            self._goaway_and_close(ErrorCodes.NO_ERROR, "idle")

    def _finished(self) -> bool:
        return self.goaway_sent and not self.streams

    async def _watch_drain(self) -> None:
        await self.proxy.drain_started.wait()
        self._start_goaway()

    def _start_goaway(self) -> None:
        """Graceful GOAWAY: streams up to ``last_stream_id`` finish, newer ones are refused.

        Written by hand rather than with ``close_connection()``: after that, h2 refuses to
        send anything more, and the streams in flight still have responses to deliver.
        """
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self._pull()
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_stream_id, error_code=0)
        self._outbox += frame.serialize()
        self._wake_writer()
        if not self.streams and self._read_scope is not None:
            self._read_scope.cancel()

    def _goaway_and_close(self, error_code: ErrorCodes, reason: str) -> None:
        try:
            self.h2.close_connection(
                error_code=error_code,
                additional_data=reason.encode("ascii", "replace")[:256],
                last_stream_id=self.last_stream_id,
            )
        except h2.exceptions.ProtocolError:
            pass
        self._pull()

    # -- sending -------------------------------------------------------------------------

    def _pull(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._outbox += data
            self._wake_writer()

    def _wake_writer(self) -> None:
        self._writer_wakeup.set()

    def credit(self, stream: H2Stream, flow_controlled_length: int) -> None:
        if not flow_controlled_length or stream.closed:
            return
        stream.unacknowledged -= flow_controlled_length
        self.h2.acknowledge_received_data(flow_controlled_length, stream.id)
        self._pull()

    def send_headers(
        self, stream: H2Stream, headers: Headers, *, end: bool, pull: bool = True
    ) -> None:
        if stream.closed:
            raise ClientDisconnected("client reset the stream")
        try:
            self.h2.send_headers(stream.id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            raise ClientDisconnected(f"cannot send headers on stream {stream.id}: {exc}") from None
        if pull:
            self._pull()

    def send_now(self, stream: H2Stream, data: bytes, *, end: bool) -> bool:
        """Hand ``data`` (and END_STREAM if ``end``) to h2 at once, outside the round robin.

        Only when nothing of the stream waits in line before it, the writer is not behind
        (the outbox is under one batch) and the client's flow-control window and frame size
        take ``data`` whole: then queueing it for the writer would only cost a task switch
        and a wait. False: nothing was sent, and the caller queues it as usual.
        """
        if stream.closed:
            raise ClientDisconnected("client reset the stream")
        if stream.outbound or stream in self._sending or len(self._outbox) >= WRITE_BATCH:
            return False
        h2_connection = self.h2
        try:
            if data:
                if len(data) > min(
                    h2_connection.local_flow_control_window(stream.id),
                    h2_connection.max_outbound_frame_size,
                ):
                    return False
                h2_connection.send_data(stream.id, data, end_stream=end)
                stream.record.bytes_out += len(data)
            elif end:
                h2_connection.end_stream(stream.id)
        except h2.exceptions.ProtocolError as exc:
            stream.close()
            raise ClientDisconnected(f"cannot send on stream {stream.id}: {exc}") from None
        if end:
            stream.end_requested = stream.ended = True
        self._pull()
        return True

    def schedule(self, stream: H2Stream) -> None:
        self._sending[stream] = None
        self._wake_writer()

    def reset(self, stream: H2Stream, error_code: int) -> None:
        if stream.closed:
            return
        stream.close()
        self._sending.pop(stream, None)
        try:
            self.h2.reset_stream(stream.id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed on the h2 side
        self._pull()

    def _send_some(self, stream: H2Stream) -> bool:
        """One DATA frame (or the end) of ``stream``; True if anything was queued."""
        if stream.closed:
            self._sending.pop(stream, None)
            return False
        sent = False
        try:
            if stream.outbound:
                size = min(
                    self.h2.local_flow_control_window(stream.id),
                    self.h2.max_outbound_frame_size,
                    len(stream.outbound),
                )
                if size <= 0:
                    # Blocked on flow control: WINDOW_UPDATE wakes the writer again.
                    return False
                self.h2.send_data(stream.id, bytes(stream.outbound[:size]))
                del stream.outbound[:size]
                # Counted once framed: within the client's window, on its way to the socket.
                stream.record.bytes_out += size
                sent = True
            if not stream.outbound and stream.end_requested and not stream.ended:
                if stream.trailers:
                    self.h2.send_headers(stream.id, stream.trailers, end_stream=True)
                else:
                    self.h2.end_stream(stream.id)
                stream.ended = sent = True
        except h2.exceptions.ProtocolError:
            # The client reset it (or the connection ended) while it waited for its turn.
            stream.close()
            self._sending.pop(stream, None)
            return False
        if sent:
            stream.progressed()
        # Round robin: a stream that still has data goes to the back of the line.
        self._sending.pop(stream, None)
        if stream.outbound or (stream.end_requested and not stream.ended):
            self._sending[stream] = None
        self._pull()
        return sent

    def _fill(self) -> None:
        progress = True
        while progress and self._sending and len(self._outbox) < WRITE_BATCH:
            progress = False
            for stream in list(self._sending):
                if len(self._outbox) >= WRITE_BATCH:
                    break
                progress = self._send_some(stream) or progress

    async def _writer(self) -> None:
        write_timeout = self.proxy.server.write_timeout or math.inf
        try:
            while True:
                self._fill()
                if not self._outbox:
                    if self._closing:
                        self._flushed = True
                        return
                    self._writer_wakeup = trio.Event()
                    await self._writer_wakeup.wait()
                    continue
                data = bytes(self._outbox)
                self._outbox.clear()
                try:
                    # The timer is set only if the kernel cannot take it all at once.
                    await fastio.send_all(self.stream, data, write_timeout)
                except trio.TooSlowError:
                    LOG.info(
                        "HTTP/2 client %s did not read for %gs",
                        self.client_ip.decode(),
                        write_timeout,
                    )
                    self._abort()
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self._abort()
                    return
                self._sent.set()
        finally:
            self._writer_done.set()

    def _abort(self) -> None:
        """The client's socket is gone: stop everything on this connection."""
        self._shut_streams()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()


async def serve_h2(
    stream: trio.abc.Stream, proxy: Proxy, client_ip: bytes, scheme: bytes, initial_data: bytes
) -> None:
    """The ``h2_handler`` for listeners: serve one client that speaks HTTP/2."""
    proxy.connections_by_protocol["h2"] += 1  # for the client-connections gauge
    try:
        await HTTP2Connection(
            stream, proxy, client_ip=client_ip, scheme=scheme, initial_data=initial_data
        ).serve()
    finally:
        proxy.connections_by_protocol["h2"] -= 1
