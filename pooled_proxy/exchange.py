"""The protocol-neutral request/response exchange shared by the HTTP/1.1 and HTTP/2 front ends.

A front end turns its wire into an :class:`Exchange` (request head, body chunks, a response
sink) and hands it to :func:`pooled_proxy.forward.forward`; the forwarder never knows which
protocol the client speaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .headers import Headers

if TYPE_CHECKING:
    import trio

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes  # origin-form: path and query
    authority: bytes  # Host header or :authority
    scheme: bytes  # b"http" | b"https", as the client reached us
    headers: Headers  # lower-case names, no Host, no pseudo-headers
    http_version: bytes  # b"1.1" | b"1.0" | b"2"
    client_ip: bytes
    has_body: bool
    content_length: int | None = None
    # Passed the request validation (protocol/request_checks.py), as every head a front end
    # builds does: its method, target and fields are in the HTTP grammar, and the upstream
    # writer need not look at their bytes again. A head built any other way is.
    validated: bool = False

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


class _NoBody:
    """The body of a bodiless request: an async iterator that ends at once, so a front end
    has no generator to create and close for every GET."""

    __slots__ = ()

    def __aiter__(self) -> _NoBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


NO_BODY: AsyncIterator[bytes] = _NoBody()


class ResponseSink(Protocol):
    """Where the forwarder writes the response; each front end implements it.

    The sink counts the body bytes it gets out to the client in its exchange's
    ``ExchangeRecord.bytes_out``: only the front end knows what left, not what it was handed
    (an HTTP/2 stream reset with its flow-control window closed sent none of it).
    """

    @property
    def head_sent(self) -> bool: ...

    async def send_informational(self, status: int, headers: Headers) -> None:
        """A 1xx response (``100 Continue``) relayed before the final head."""

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        """The response head, with the start of the body (or all of it, with ``end``) when it
        is already at hand, so a small response goes out in one write."""

    async def send_data(self, data: bytes) -> None: ...

    async def end(self, trailers: Headers | None = None) -> None: ...

    async def reset(self, error_code: int = 0x2) -> None:
        """Abort a response whose head was already sent, so the client sees it as incomplete:
        an HTTP/2 stream is reset with ``error_code`` (INTERNAL_ERROR unless the upstream's
        own reset is relayed), an HTTP/1.1 connection is closed."""


class ClientUpgrade(Protocol):
    """A client connection that can switch protocols (HTTP/1.1 ``Upgrade: websocket``)."""

    async def switch_protocols(self, headers: Headers) -> tuple[trio.abc.Stream, bytes]:
        """Send ``101 Switching Protocols`` and hand over the raw client stream, with the
        bytes the client already sent behind its request; HTTP on it is over."""
        ...


@dataclass(slots=True)
class ExchangeRecord:
    """What happened to one exchange: the access log line and the metrics come from this."""

    start: float  # trio.current_time() when the request head was complete
    wall_start: float  # time.time() at the same moment, for the log
    method: bytes = b""
    target: bytes = b""
    protocol: bytes = b""
    client_ip: bytes = b""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0  # response body bytes written to the client's socket (the sink counts)
    route: str = ""  # the matched route as "host/prefix" ("*" for any host)
    route_upstream: str = ""
    upstream_server: str = ""
    upstream_reused: bool | None = None
    retried: bool = False
    # The servers tried before ``upstream_server``, each with the Proxy-Status error that
    # made the request go on to the next one (see Forwarder: next server).
    servers_failed: tuple[tuple[str, str], ...] = ()
    connect_time: float | None = None  # opening the upstream connection, when a new one was opened
    upstream_header_time: float | None = None  # request sent upstream -> response head received
    ttfb: float | None = None
    duration: float = 0.0
    error: str = ""  # the Proxy-Status error type, if any
    request_id: bytes = b""  # sent upstream and returned to the client ([server] request_id)
    event_stream: bool = False
    # The request's headers as the client sent them (read by the access log's combined
    # format for Referer and User-Agent); a reference, not a copy.
    request_headers: Sequence[tuple[bytes, bytes]] = ()
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Exchange:
    head: RequestHead
    body: AsyncIterator[bytes]
    sink: ResponseSink
    record: ExchangeRecord
    # The request's whole body, when the front end already has all of it (it came in the
    # same read as the head): sent upstream with the head, with no upload task. ``body``
    # is then empty.
    whole_body: bytes | None = None
    # Set by the HTTP/1.1 front end for a bodiless request asking for a WebSocket upgrade:
    # forward() then keeps the Upgrade headers and turns a 101 into a byte tunnel.
    upgrade: ClientUpgrade | None = None
    # Called by the forwarder (maybe more than once) when it waits on something other than
    # the client: before a connect; once a wait in a pool queue, for the upstream's answer
    # head or for the rest of its body has lasted the pool's WATCH_AFTER. It asks the pool
    # and the upstream connection, which answer without waiting, whether it must. The
    # HTTP/1.1 front end starts watching the client for a disconnect only then, so an
    # exchange answered soon costs no watch at all.
    on_wait: Callable[[], None] | None = None


# Called with each finished exchange's record: the access log, the metrics.
ExchangeObserver = Callable[[ExchangeRecord], None]


class ExchangeTap(Protocol):
    """Sees every exchange go by (the request inspector). The forwarder calls it only when one
    is set, and never waits on it: a tap copies what passes and never holds it back."""

    def started(self, exchange: Exchange) -> Exchange:
        """The exchange to serve in its place: the same head and record, with a body and a
        sink that let the tap see what passes through them."""
        ...

    def upstream_request(
        self, record: ExchangeRecord, target: bytes, headers: Headers, version: bytes
    ) -> None:
        """The request head as it goes upstream, rewritten (once per attempt), and the
        upstream connection's HTTP version as Via names it (b"1.1", b"2")."""

    def upstream_response(self, record: ExchangeRecord, status: int, headers: Headers) -> None:
        """The upstream's response head as it arrived, before the client's is made from it."""

    def finished(self, record: ExchangeRecord) -> None:
        """The exchange is over; ``record`` says how it went."""
