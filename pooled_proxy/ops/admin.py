"""The admin listener: metrics, health, and the live status of the proxy.

A tiny trio + h11 HTTP/1.1 server, separate from the proxy's front ends so that it answers
while the proxy drains: it runs in the lifecycle's root nursery, which outlives the
listeners and the handler nursery, and is cancelled only when the process is about to exit.

- ``/healthz`` (liveness): 200 while the event loop answers, draining or not.
- ``/readyz`` (readiness): 200, or 503 from the moment a drain starts, so a load balancer
  stops sending new traffic while in-flight exchanges finish; with
  ``ready_requires_healthy_upstreams``, also 503 while an upstream has no server in rotation.
- ``/metrics``: the proxy's registry, in the Prometheus text format (or OpenMetrics when the
  scraper's ``Accept`` header asks for it).
- ``/upstreams``, ``/config``, ``/status`` (JSON) and ``/events`` (the status as
  Server-Sent Events, one a sample): see status.py.
- ``/``: the status page, one self-contained HTML file (status_page.html) that follows
  ``/events``.
- ``/inspect`` and below: the request inspector, when it is on (inspector/endpoints.py).

With ``workers > 1`` the supervisor serves it, for the whole group (workers.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from functools import cache
from importlib import resources
from typing import Protocol

import trio

from .._h11 import h11
from ..config import ServerAddress
from ..fastio import CLOSE_TIMEOUT
from ..server.listen import bound_address, open_listeners
from .status import StatusSource, json_body

LOG = logging.getLogger("pooled_proxy.admin")

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
PAGE_PATH = "/"
UPSTREAMS_PATH = "/upstreams"
CONFIG_PATH = "/config"
STATUS_PATH = "/status"
EVENTS_PATH = "/events"
STATUS_PATHS = (PAGE_PATH, UPSTREAMS_PATH, CONFIG_PATH, STATUS_PATH, EVENTS_PATH)

READ_SIZE = 16 * 1024  # the most one read takes: admin requests are small
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024  # a replay's edits at most; a larger body is answered 413
REQUEST_TIMEOUT = 30.0  # to receive a whole request, keep-alive idle time included
MAX_EVENT_STREAMS = 32  # open /events streams (status pages) at once; more get a 503
EVENTS_RETRY_MS = 2000  # how soon a page reconnects after the process restarted

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
# The page loads nothing from anywhere (no CDN, no font, no image file): the policy says so
# to the browser too, and it may only connect back to this admin port for its events.
PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (
        b"content-security-policy",
        (
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
        ),
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
EVENTS_HEADERS = [(b"content-type", b"text/event-stream"), (b"x-accel-buffering", b"no")]
_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

# The events of an event stream, each ready to send, until the viewer goes away.
EventStream = Callable[[], AsyncGenerator[bytes, None]]
# Status, headers and body; an EventStream body follows the head for as long as it runs.
Answer = tuple[int, list[tuple[bytes, bytes]], bytes | EventStream]


@cache
def status_page() -> bytes:
    return resources.files(__package__).joinpath("status_page.html").read_bytes()


class Served(Protocol):
    """What the admin server reports on: a proxy, or the supervisor of its workers."""

    @property
    def draining(self) -> bool: ...

    async def unready_upstreams(self) -> list[str]:
        """Upstreams that make it not ready: with ``[admin] ready_requires_healthy_upstreams``,
        those with no server in rotation (health checks); else none."""
        ...


class MetricsSource(Protocol):
    async def scrape(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its content type for a scraper's ``Accept`` header."""
        ...


class AdminRoutes(Protocol):
    """More endpoints under a path prefix (the inspector's), with their own methods."""

    def handles(self, path: str) -> bool: ...

    async def answer(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> Answer: ...


class _Close(Exception):
    """The client went away, misbehaved or was too slow: close without answering."""


class _TooLarge(Exception):
    """A request body over MAX_BODY: answered 413, then the connection is closed."""


class AdminServer:
    """Serves the admin endpoints of one proxy on ``listen``; ``address`` once bound."""

    def __init__(
        self,
        proxy: Served,
        metrics: MetricsSource,
        listen: ServerAddress,
        *,
        status: StatusSource | None = None,
        routes: AdminRoutes | None = None,
    ) -> None:
        """``status`` (whose owner runs its sampler) serves /upstreams, /config, /status,
        /events and the page; without it they are not found. ``routes``: the inspector's."""
        self.proxy = proxy
        self.metrics = metrics
        self.listen = listen
        self.address: ServerAddress | None = None
        self.status = status
        self.routes = routes
        self.event_streams = 0
        self._event: tuple[int, bytes] = (-1, b"")
        self.max_event_streams = MAX_EVENT_STREAMS

    async def serve(
        self, *, task_status: trio.TaskStatus[ServerAddress] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, report the bound address through ``task_status``, serve until cancelled."""
        listeners = await open_listeners((self.listen,))
        self.address = bound_address(listeners[0])
        LOG.info(
            "admin listening on http://%s (%s, %s, %s)",
            self.address, METRICS_PATH, HEALTH_PATH, READY_PATH,
        )  # fmt: skip
        task_status.started(self.address)
        await trio.serve_listeners(self._serve_connection, listeners)

    async def answer(
        self,
        method: bytes,
        target: bytes,
        accept: bytes,
        *,
        headers: dict[bytes, bytes] | None = None,
        request_body: bytes = b"",
    ) -> Answer:
        """Status, headers and body for one admin request."""
        path = target.split(b"?", 1)[0].decode("latin-1")
        body: bytes | EventStream
        routes = self.routes if self.routes is not None and self.routes.handles(path) else None
        try:
            if routes is not None:
                status, headers_out, body = await routes.answer(
                    method, target, headers or {}, request_body
                )
                return self._finish(status, headers_out, body)  # its own methods
            status, headers_out, body = await self._route(path, accept)
        except (TypeError, ValueError):
            # A status that cannot be rendered is a bug to log, not a reason to stop serving.
            LOG.exception("admin: %s failed", path)
            status, headers_out, body = 500, [(b"content-type", TEXT)], b"internal error\n"
            if routes is not None:
                return self._finish(status, headers_out, body)
        if status != 404 and method not in (b"GET", b"HEAD"):
            status, body = 405, b"method not allowed\n"
            headers_out = [(b"content-type", TEXT), (b"allow", b"GET, HEAD")]
        return self._finish(status, headers_out, body)

    def _finish(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | EventStream
    ) -> Answer:
        if not isinstance(body, bytes) and self.event_streams >= self.max_event_streams:
            status, body = 503, b"too many event streams\n"
            headers = [(b"content-type", TEXT)]
        if isinstance(body, bytes):
            headers.append((b"content-length", str(len(body)).encode()))
        headers.append((b"cache-control", b"no-store"))
        return status, headers, body

    async def _route(self, path: str, accept: bytes) -> Answer:
        body: bytes | EventStream
        source = self.status
        if path == METRICS_PATH:
            body, content_type = await self.metrics.scrape(accept.decode("latin-1"))
            status, headers = 200, [(b"content-type", content_type.encode())]
        elif path == HEALTH_PATH:
            status, body, headers = 200, b"ok\n", [(b"content-type", TEXT)]
        elif path == READY_PATH:
            status, body = await self._readiness()
            headers = [(b"content-type", TEXT)]
        elif source is None or path not in STATUS_PATHS:
            status, body, headers = 404, b"not found\n", [(b"content-type", TEXT)]
        elif path == PAGE_PATH:
            status, body, headers = 200, status_page(), list(PAGE_HEADERS)
        elif path == EVENTS_PATH:
            status, body, headers = 200, self._status_events, list(EVENTS_HEADERS)
        else:
            if path == UPSTREAMS_PATH:
                snapshot = await source.status()
                answer = {"process": snapshot["process"], "upstreams": snapshot["upstreams"]}
            elif path == CONFIG_PATH:
                answer = await source.config()
            else:
                answer = await source.status()
            status, body, headers = 200, json_body(answer), [(b"content-type", JSON)]
        return status, headers, body

    async def _readiness(self) -> tuple[int, bytes]:
        if self.proxy.draining:
            return 503, b"draining\n"
        down = await self.proxy.unready_upstreams()
        if down:
            return 503, f"no healthy server in upstream(s): {', '.join(down)}\n".encode()
        return 200, b"ready\n"

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT) as timeout:
                    try:
                        request, request_body = await _read_request(conn, stream)
                    except _TooLarge:
                        await self._refuse_large(conn, stream)
                        return
                if timeout.cancelled_caught or request is None:
                    return
                headers = dict(request.headers)
                status, response_headers, body = await self.answer(
                    request.method,
                    request.target,
                    headers.get(b"accept", b""),
                    headers=headers,
                    request_body=request_body,
                )
                data = conn.send(
                    h11.Response(
                        status_code=status, headers=response_headers, reason=_REASONS[status]
                    )
                )
                if request.method == b"HEAD":
                    pass
                elif not isinstance(body, bytes):
                    await self._send_events(conn, stream, body, head=data)
                    return
                else:
                    data += conn.send(h11.Data(data=body))
                data += conn.send(h11.EndOfMessage())
                await stream.send_all(data)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (
            _Close,
            h11.ProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ):
            return
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await stream.aclose()

    async def _refuse_large(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        body = b"request body too large\n"
        headers = [(b"content-type", TEXT), (b"connection", b"close")]
        status, headers, _ = self._finish(413, headers, body)
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS[413]))
        await stream.send_all(data + conn.send(h11.Data(data=body)))

    async def _send_events(
        self, conn: h11.Connection, stream: trio.abc.Stream, events: EventStream, head: bytes
    ) -> None:
        """The response ``head`` with the first event, then each event as it comes, until the
        client goes away (or the process exits)."""
        # Counted before anything waits: _finish checked the bound with no checkpoint since,
        # so streams asked for at once cannot all pass it.
        self.event_streams += 1
        try:
            async with aclosing(events()) as each:
                async for data in each:
                    # A viewer that stops reading is let go, not waited for.
                    with trio.move_on_after(REQUEST_TIMEOUT) as timeout:
                        await stream.send_all(head + conn.send(h11.Data(data=data)))
                    if timeout.cancelled_caught:
                        return
                    head = b""
        finally:
            self.event_streams -= 1

    async def _status_events(self) -> AsyncGenerator[bytes, None]:
        """The status now, then once per sample; it never ends on its own."""
        source = self.status
        assert source is not None
        yield b"retry: %d\n\n" % EVENTS_RETRY_MS + await self._event_data(source)
        while True:
            await source.next_tick()
            yield await self._event_data(source)

    async def _event_data(self, source: StatusSource) -> bytes:
        """The status as one Server-Sent Event, built once per sample for every viewer."""
        ticks = source.ticks
        if self._event[0] != ticks:
            status = json.dumps(await source.status(), separators=(",", ":"))
            self._event = (ticks, b"data: " + status.encode() + b"\n\n")
        return self._event[1]


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream
) -> tuple[h11.Request | None, bytes]:
    """The next request and its body; None when the client closed."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:  # ConnectionClosed
            return None, b""
