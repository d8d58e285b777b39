"""HTTP/2 to an upstream server: one connection carries many exchanges, each on its own stream.

The shape is the HTTP/2 front end's, seen from the client side:

- :class:`H2UpstreamConnection` is one socket and one h2 client connection. Its **reader**
  (a task in the pool's nursery) takes GOAWAY frames out of the server's bytes (see
  :mod:`pooled_proxy.protocol.h2_client`), feeds the rest to h2 and hands the events to the
  streams; its **writer** owns the socket's send side and sends what h2 wrote.
- :class:`H2UpstreamStream` is the upstream side of one exchange, with the interface
  forward() uses for an HTTP/1.1 connection (``send_request``, ``send_body``,
  ``receive_response_head``, ``receive_data``, ``trailers``, ``close``), so the forwarder
  does not know which protocol the upstream speaks.

Flow control both ways, nothing buffered whole: a request body goes up only as the server's
stream and connection windows allow (``send_body`` waits for its WINDOW_UPDATE, then for the
writer to have sent it), and a response body is credited back to the server only as the
forwarder takes it, that is once the client took the previous chunk: each stream holds at
most one window (``STREAM_WINDOW``) of the server's data.

Everything above this module sees only :mod:`pooled_proxy.errors`: h2 and trio exceptions
are mapped here, as in upstream.py.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import deque
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
from h2.errors import ErrorCodes

from .. import fastio
from ..config import ServerAddress
from ..errors import (
    ConnectTimeout,
    ProxyInternalError,
    StreamNotProcessed,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamReset,
    UpstreamTlsError,
)
from ..headers import Headers
from ..protocol.h2_client import Goaway, GoawaySplitter
from .connection import MAX_RESPONSE_HEAD, ResponseHead, open_stream, tls_alert

LOG = logging.getLogger("pooled_proxy.upstream_h2")

# What each stream may receive before the forwarder takes it, and all streams together.
STREAM_WINDOW = 128 * 1024
CONNECTION_WINDOW = 8 * 1024 * 1024
DEFAULT_WINDOW = 65535  # RFC 9113's initial window, before our SETTINGS apply
# A stream's send returns once the connection has at most this much not yet written.
OUTBOX_LOW_WATER = 64 * 1024
GOAWAY_TIMEOUT = 1.0  # for the goodbye (GOAWAY) when the pool closes a connection
SETTING = h2.settings.SettingCodes
# Request fields that are HTTP/1.1's framing or connection handling: HTTP/2 forbids them
# (RFC 9113 section 8.2.2). The forwarder already dropped the client's; these are the ones
# it adds for an HTTP/1.1 upstream (chunked framing, a WebSocket upgrade). Host goes as
# :authority.
_NOT_IN_H2 = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
    | {b"host"}
)


async def open_h2_connection(
    server: ServerAddress,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> H2UpstreamConnection:
    """A new HTTP/2 connection to ``server``, ready for streams: connected (TLS with ALPN
    ``h2`` for an https:// server, prior knowledge otherwise), and the server's SETTINGS
    received, all within ``connect_timeout``."""
    deadline = trio.current_time() + (connect_timeout or math.inf)
    stream = await open_stream(
        server, connect_timeout=connect_timeout, ssl_context=ssl_context, server_name=server_name
    )
    try:
        if isinstance(stream, trio.SSLStream) and stream.selected_alpn_protocol() != "h2":
            chosen = stream.selected_alpn_protocol() or "none"
            raise UpstreamTlsError(
                f"TLS with {server}: the server does not speak HTTP/2 (ALPN: {chosen})",
                client_detail="the server did not select h2 by ALPN",
            )
        connection = H2UpstreamConnection(stream, server)
        await connection.handshake(deadline, connect_timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return connection


class H2UpstreamConnection:
    """One HTTP/2 connection to an upstream server; the pool hands out its streams."""

    def __init__(self, stream: trio.abc.Stream, server: ServerAddress) -> None:
        self.server = server
        self.scheme = b"https" if server.tls else b"http"
        self._stream = stream
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self._splitter = GoawaySplitter()
        self.streams: dict[int, H2UpstreamStream] = {}  # by stream id, once sent
        # The pool's bookkeeping: streams handed out and not taken back, and ever.
        self.active = 0
        self.requests_sent = 0
        self.max_streams = 1  # the server's SETTINGS_MAX_CONCURRENT_STREAMS, once known
        self.connect_time: float | None = None
        self.idle_since = trio.current_time()
        self.goaway: Goaway | None = None
        # No new streams: the server sent GOAWAY, a limit was reached, or the pool is closing.
        self.retired = False
        self.closed = False
        self.failure: UpstreamError | None = None  # why it ended, if the server ended it
        # Called when what the connection can take changed (SETTINGS, GOAWAY): the pool
        # hands out streams or closes it.
        self.on_change: Callable[[], None] = lambda: None
        # Shielded: a pool that is being retired lets its busy connections finish their
        # streams; the pool cancels this scope to stop the connection at once.
        self.scope = trio.CancelScope(shield=True)
        self._settings_received = False
        self._outbox = bytearray()
        self._writer_wakeup = trio.Event()
        self._writer_done = trio.Event()
        self._sent: trio.Event | None = None
        self._read_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<H2UpstreamConnection {self.server} streams={self.active}/{self.max_streams}>"

    @property
    def available(self) -> int:
        """Streams it can take now."""
        if self.retired or self.closed:
            return 0
        return self.max_streams - self.active

    # -- set-up ----------------------------------------------------------------------------

    def _initiate(self) -> None:
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                SETTING.ENABLE_PUSH: 0,
                SETTING.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SETTING.MAX_HEADER_LIST_SIZE: MAX_RESPONSE_HEAD,
            },
        )
        self.h2.decoder.max_header_list_size = MAX_RESPONSE_HEAD
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - DEFAULT_WINDOW)
        self._flush()

    async def handshake(self, deadline: float, connect_timeout: float) -> None:
        """Send our preface and SETTINGS, and read until the server's SETTINGS came."""
        self._initiate()
        data = bytes(self._outbox)
        self._outbox.clear()
        try:
            with trio.CancelScope(deadline=deadline) as scope:
                await self._stream.send_all(data)
                while not self._settings_received:
                    received = await self._stream.receive_some(fastio.MAX_RECEIVE)
                    if not received:
                        raise UpstreamProtocolError(
                            f"{self.server} closed the connection instead of answering the "
                            "HTTP/2 preface: does it speak HTTP/2?"
                        )
                    self._receive(bytes(received))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # Nothing was sent yet: a failed connect, as far as the request is concerned.
            raise tls_alert(self.server, exc) or UpstreamConnectError(
                f"upstream {self.server} reset the connection in the HTTP/2 handshake: {exc}"
            ) from None
        if scope.cancelled_caught:
            raise ConnectTimeout(
                f"no HTTP/2 SETTINGS from {self.server} within {connect_timeout:g}s"
            )

    # -- the connection ----------------------------------------------------------------------

    async def run(self) -> None:
        """Read and write until the connection ends (the server closes it, it fails, or the
        pool closes it); then every stream still on it fails."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer)
                    self.failure = await self._read_loop()
                    # Let the writer send what is left (our GOAWAY) for a moment.
                    self.closed = True
                    self._writer_wakeup.set()
                    with trio.move_on_after(GOAWAY_TIMEOUT):
                        await self._writer_done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            self._end()
            await trio.aclose_forcefully(self._stream)

    async def _read_loop(self) -> UpstreamError | None:
        """Until the connection ends; the server's failure, or ``None`` when we closed it."""
        while not self.closed:
            scope = self._read_scope = trio.CancelScope()
            try:
                with scope:
                    data = await fastio.receive_some(self._stream, fastio.MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                return UpstreamClosed(f"upstream {self.server} reset the connection: {exc}")
            finally:
                self._read_scope = None
            if scope.cancelled_caught:
                return None
            if not data:
                return UpstreamClosed(f"upstream {self.server} closed the connection")
            try:
                self._receive(data)
            except UpstreamProtocolError as exc:
                return exc
        return None

    async def _writer(self) -> None:
        try:
            while True:
                if not self._outbox:
                    if self.closed:
                        return
                    self._writer_wakeup = trio.Event()
                    await self._writer_wakeup.wait()
                    continue
                data = bytes(self._outbox)
                self._outbox.clear()
                try:
                    await fastio.send_all(self._stream, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self.failure = self.failure or UpstreamClosed(
                        f"upstream {self.server} closed while we were sending: {exc}"
                    )
                    self.abort()
                    return
                if self._sent is not None:
                    self._sent.set()
                    self._sent = None
        finally:
            self._writer_done.set()

    def _end(self) -> None:
        self.closed = self.retired = True
        failure = self.failure or UpstreamClosed(f"connection to {self.server} closed")
        for stream in list(self.streams.values()):
            stream.fail(self._not_processed(stream) or failure)
        if self._sent is not None:
            self._sent.set()

    def _not_processed(self, stream: H2UpstreamStream) -> StreamNotProcessed | None:
        """The error of a stream above the last stream id of the server's GOAWAY, if it is."""
        goaway = self.goaway
        if stream.id is not None and goaway is not None and stream.id > goaway.last_stream_id:
            return StreamNotProcessed(
                f"upstream {self.server} went away (GOAWAY) before stream {stream.id}"
            )
        return None

    def close(self) -> None:
        """Close gracefully: GOAWAY, then the socket (the pool's idle or drained connection)."""
        if self.closed:
            return
        self.retired = True
        try:
            self.h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        self._flush()
        self.closed = True
        self._writer_wakeup.set()
        if self._read_scope is not None:
            self._read_scope.cancel()

    def abort(self) -> None:
        """Stop at once: the socket is gone, or the proxy is stopping."""
        self.closed = self.retired = True
        self.scope.cancel()

    # -- receiving -------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        data, goaways = self._splitter.feed(data)
        try:
            events = self.h2.receive_data(data) if data else []
        except h2.exceptions.ProtocolError as exc:
            self._flush()  # h2 wrote its GOAWAY
            raise UpstreamProtocolError(
                f"bad HTTP/2 from {self.server}: {exc.__class__.__name__}: {exc}"
            ) from None
        for event in events:
            self._handle(event)
        for goaway in goaways:
            self._goaway_received(goaway)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            length = event.flow_controlled_length or 0
            if stream is not None:
                stream.data_received(event.data or b"", length)
            elif length:
                # Nobody will read it: hand the window straight back.
                self.h2.acknowledge_received_data(length, event.stream_id or 0)
        elif isinstance(
            event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)
        ):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.head_received(event.headers or [])
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.response_complete()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.reset_by_server(event.error_code)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.wake()
            else:
                self._wake_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_received = True
            self.max_streams = self.h2.remote_settings.max_concurrent_streams
            self._wake_all()  # the initial window may have changed
            self.on_change()

    def _goaway_received(self, goaway: Goaway) -> None:
        if self.goaway is None or goaway.last_stream_id < self.goaway.last_stream_id:
            self.goaway = goaway
        self.retired = True
        if goaway.error_code:
            LOG.info(
                "upstream %s sent GOAWAY with error %s: %s",
                self.server,
                _error_name(goaway.error_code),
                goaway.debug_data.decode("latin-1"),
            )
        for stream in list(self.streams.values()):
            not_processed = self._not_processed(stream)
            if not_processed is not None:
                stream.fail(not_processed)
        self.on_change()

    def _wake_all(self) -> None:
        for stream in self.streams.values():
            stream.wake()

    # -- sending ---------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self._outbox += data
            self._writer_wakeup.set()

    async def wait_written(self) -> None:
        """Until the writer is no more than ``OUTBOX_LOW_WATER`` behind: what a stream sent
        has (nearly) left, so its sender may take the next chunk."""
        while len(self._outbox) > OUTBOX_LOW_WATER and not self.closed:
            sent = self._sent = self._sent or trio.Event()
            await sent.wait()
        await trio.lowlevel.checkpoint()

    def reset(self, stream: H2UpstreamStream, error_code: ErrorCodes) -> None:
        if stream.id is None:
            return
        try:
            self.h2.reset_stream(stream.id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # already closed on the h2 side
        self._flush()


def _error_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class H2UpstreamStream:
    """The upstream side of one exchange: a stream of an :class:`H2UpstreamConnection`."""

    http_version = b"2"  # for Via
    upgraded = False  # HTTP/2 has no protocol switch (RFC 9113 section 8.6)

    def __init__(self, connection: H2UpstreamConnection, *, owns_connection: bool = False) -> None:
        self.connection = connection
        self.owns_connection = owns_connection  # a health probe's: closed with the stream
        self.server = connection.server
        self.id: int | None = None  # once its HEADERS went out
        self.connect_time: float | None = None
        self.received_bytes = 0
        self.trailers: Headers = []
        self.error: UpstreamError | None = None
        self.request_ended = False
        self.response_ended = False
        self._heads: deque[ResponseHead] = deque()
        self._final_head = False
        self._inbound: list[bytes] = []
        self._unacknowledged = 0  # flow-controlled bytes received, not yet credited back
        # What the response side and the request side (an upload task) wait on.
        self._received: trio.Event | None = None
        self._window: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<H2UpstreamStream {self.server} id={self.id}>"

    # -- events from the connection's reader -------------------------------------------------

    def wake(self) -> None:
        if self._received is not None:
            self._received.set()
        if self._window is not None:
            self._window.set()

    def head_received(self, headers: Headers) -> None:
        status = 0
        fields: Headers = []
        for name, value in headers:
            self.received_bytes += len(name) + len(value)
            if name == b":status":
                status = int(value)
            elif not name.startswith(b":"):
                fields.append((name, value))
        informational = status < 200
        if not informational:
            self._final_head = True
        self._heads.append(ResponseHead(status, fields, informational=informational))
        self.wake()

    def data_received(self, data: bytes, flow_controlled_length: int) -> None:
        self.received_bytes += len(data)
        self._unacknowledged += flow_controlled_length
        if data:
            self._inbound.append(data)
        self.wake()

    def response_complete(self) -> None:
        self.response_ended = True
        self.wake()

    def reset_by_server(self, error_code: int) -> None:
        if error_code == ErrorCodes.REFUSED_STREAM and not self.received_bytes:
            # (After part of a response, the server did process it: a reset like another.)
            self.fail(
                StreamNotProcessed(
                    f"upstream {self.server} refused stream {self.id}",
                    client_detail="upstream reset the stream (REFUSED_STREAM)",
                )
            )
        elif not self.response_ended:
            name = _error_name(error_code)
            self.fail(
                UpstreamStreamReset(
                    f"upstream {self.server} reset stream {self.id} ({name})",
                    error_code=error_code,
                    code_name=name,
                )
            )
        else:
            # After a complete response: the server wants no more of the request body
            # (RFC 9113 section 8.1); the upload stops on the error, the response stands.
            self.error = UpstreamClosed(
                f"upstream {self.server} answered before the request body was complete"
            )
            self.wake()

    def fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self.wake()

    # -- waiting -----------------------------------------------------------------------------

    async def _wait(self, deadline: float) -> None:
        """Until the reader has something for this stream; ``trio.TooSlowError`` at
        ``deadline``."""
        event = self._received = trio.Event()
        with trio.CancelScope(deadline=deadline) as scope:
            await event.wait()
        self._received = None
        if scope.cancelled_caught:
            raise trio.TooSlowError

    # -- the request -------------------------------------------------------------------------

    async def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        *,
        end: bool,
        body: bytes = b"",
        valid_syntax: bool = False,
    ) -> None:
        """Open the stream with the request head; with ``end``, the request is complete:
        bodiless, or with its whole ``body``. (``valid_syntax`` is HTTP/1.1's: h2 checks
        what it sends anyway.)"""
        connection = self.connection
        if self.error is not None:
            raise self.error
        if connection.retired or connection.closed:
            raise StreamNotProcessed(f"connection to {self.server} went away before the request")
        authority = headers[0][1] if headers and headers[0][0] == b"host" else b""
        block: Headers = [
            (b":method", method),
            (b":scheme", connection.scheme),
            (b":authority", authority),
            (b":path", target),
        ]
        block += [(name, value) for name, value in headers if name not in _NOT_IN_H2]
        # TE is hop-by-hop: it says what this hop's client, the proxy, accepts, and the
        # proxy relays trailers (gRPC servers want to hear it).
        block.append((b"te", b"trailers"))
        h2_connection = connection.h2
        stream_id = h2_connection.get_next_available_stream_id()
        try:
            h2_connection.send_headers(stream_id, block, end_stream=end and not body)
        except h2.exceptions.TooManyStreamsError:
            raise StreamNotProcessed(
                f"{self.server} lowered its stream limit below the streams in flight"
            ) from None
        except h2.exceptions.ProtocolError as exc:
            # Our request validation should have refused what h2 refuses to write.
            raise ProxyInternalError(f"cannot write the request to {self.server}: {exc}") from None
        self.id = stream_id
        connection.streams[stream_id] = self
        connection._flush()
        if body:
            await self._send_data(body, end=end)
        else:
            self.request_ended = end
            await connection.wait_written()

    async def send_body(self, chunk: bytes) -> None:
        await self._send_data(chunk, end=False)

    async def end_body(self) -> None:
        await self._send_data(b"", end=True)

    async def _send_data(self, data: bytes, *, end: bool) -> None:
        """Send ``data`` as the server's flow-control windows allow, then wait for the writer."""
        connection = self.connection
        h2_connection = connection.h2
        assert self.id is not None
        view = memoryview(data)
        while True:
            if self.error is not None or connection.closed:
                raise UpstreamClosed(
                    f"upstream {self.server} closed stream {self.id} while we were sending"
                )
            try:
                if not view:
                    if end:
                        h2_connection.end_stream(self.id)
                        self.request_ended = True
                    break
                size = min(
                    h2_connection.local_flow_control_window(self.id),
                    h2_connection.max_outbound_frame_size,
                    len(view),
                )
                if size > 0:
                    last = size == len(view)
                    h2_connection.send_data(self.id, bytes(view[:size]), end_stream=end and last)
                    view = view[size:]
                    if last:
                        self.request_ended = end
                        break
                    continue
            except h2.exceptions.ProtocolError:
                raise UpstreamClosed(
                    f"upstream {self.server} closed stream {self.id} while we were sending"
                ) from None
            finally:
                connection._flush()
            # Blocked on flow control: a WINDOW_UPDATE (or the end) wakes us.
            event = self._window = trio.Event()
            await event.wait()
            self._window = None
        await connection.wait_written()

    # -- the response ------------------------------------------------------------------------

    def response_at_hand(self) -> bool:
        """Whether ``receive_response_head`` has its answer without waiting."""
        return bool(self._heads) or self.error is not None or self.response_ended

    async def receive_response_head(self, deadline: float = math.inf) -> ResponseHead:
        """The next response head (a 1xx, or the final one); ``trio.TooSlowError`` if it is
        not there by ``deadline``."""
        while True:
            if self._heads:
                return self._heads.popleft()
            if self.error is not None:
                raise self.error
            if self.response_ended:  # h2 allows no END_STREAM before the head
                raise UpstreamProtocolError(
                    f"stream {self.id} of {self.server} ended without a head"
                )
            await self._wait(deadline)

    def _take(self) -> bytes:
        chunks = self._inbound
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._unacknowledged:
            # The forwarder took it: only now may the server send more in its place.
            connection = self.connection
            assert self.id is not None
            connection.h2.acknowledge_received_data(self._unacknowledged, self.id)
            self._unacknowledged = 0
            connection._flush()
        return data

    def buffered_body(self) -> tuple[bytes, bool]:
        """The response body that already arrived, and whether the response ended there."""
        data = self._take() if self._inbound else b""
        return data, self.response_ended

    async def receive_data(self, deadline: float = math.inf) -> bytes | None:
        """The next response body bytes, or ``None`` at the end (see ``trailers``);
        ``trio.TooSlowError`` if nothing came by ``deadline``."""
        while True:
            if self._inbound:
                return self._take()
            if self.response_ended:
                return None
            if self.error is not None:
                raise self.error
            await self._wait(deadline)

    def close(self) -> None:
        """Give up on the exchange (a timeout): the stream is reset, the connection stays."""
        self.fail(UpstreamClosed(f"stream {self.id} to {self.server} was cancelled"))
        self.connection.reset(self, ErrorCodes.CANCEL)
        if self.owns_connection:
            self.connection.close()

    def finish(self, *, reset: bool) -> None:
        """The exchange is over (the pool takes the stream back): reset the stream if asked
        to or if either side is still open, and give back the window of what nobody will
        read."""
        connection = self.connection
        if self.id is None:
            return
        if reset or not (self.request_ended and self.response_ended) or self.error is not None:
            connection.reset(self, ErrorCodes.CANCEL)
        if self._unacknowledged:
            try:
                connection.h2.acknowledge_received_data(self._unacknowledged, self.id)
            except h2.exceptions.ProtocolError:
                pass  # the connection is closing anyway
            self._unacknowledged = 0
            connection._flush()
        self._inbound.clear()
        connection.streams.pop(self.id, None)
