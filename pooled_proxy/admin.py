"""The admin listener: ``GET /metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

A tiny trio + h11 HTTP/1.1 server, separate from the proxy's front ends so that it answers
while the proxy drains: it runs in the lifecycle's root nursery, which outlives the
listeners and the handler nursery, and is cancelled only when the process is about to exit.

- ``/healthz`` (liveness): 200 while the event loop answers, draining or not.
- ``/readyz`` (readiness): 200, or 503 from the moment a drain starts, so a load balancer
  stops sending new traffic while in-flight exchanges finish.
- ``/metrics``: the proxy's registry, in the Prometheus text format (or OpenMetrics when the
  scraper's ``Accept`` header asks for it).

With ``workers > 1`` the supervisor serves it, for the whole group (workers.py).
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from ._h11 import h11
from .config import ServerAddress
from .server.listen import bound_address, open_listeners

LOG = logging.getLogger("pooled_proxy.admin")

METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"

MAX_RECEIVE = 16 * 1024
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024  # admin requests carry no body; a larger one closes the connection
REQUEST_TIMEOUT = 30.0  # to receive a whole request, keep-alive idle time included
CLOSE_TIMEOUT = 2.0

TEXT = b"text/plain; charset=utf-8"
_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class Served(Protocol):
    """What the admin server reports on: a proxy, or the supervisor of its workers."""

    @property
    def draining(self) -> bool: ...


class MetricsSource(Protocol):
    async def scrape(self, accept: str) -> tuple[bytes, str]:
        """The scrape body and its content type for a scraper's ``Accept`` header."""
        ...


class _Close(Exception):
    """The client went away, misbehaved or was too slow: close without answering."""


class AdminServer:
    """Serves the admin endpoints of one proxy on ``listen``; ``address`` once bound."""

    def __init__(self, proxy: Served, metrics: MetricsSource, listen: ServerAddress) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.listen = listen
        self.address: ServerAddress | None = None

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

    async def answer(self, method: bytes, target: bytes, accept: bytes) -> Answer:
        """Status, headers and body for one admin request."""
        path = target.split(b"?", 1)[0].decode("latin-1")
        if path in (METRICS_PATH, HEALTH_PATH, READY_PATH) and method not in (b"GET", b"HEAD"):
            status, body = 405, b"method not allowed\n"
            headers = [(b"content-type", TEXT), (b"allow", b"GET, HEAD")]
        elif path == METRICS_PATH:
            body, content_type = await self.metrics.scrape(accept.decode("latin-1"))
            status, headers = 200, [(b"content-type", content_type.encode())]
        elif path == HEALTH_PATH:
            status, body, headers = 200, b"ok\n", [(b"content-type", TEXT)]
        elif path == READY_PATH:
            if self.proxy.draining:
                status, body = 503, b"draining\n"
            else:
                status, body = 200, b"ready\n"
            headers = [(b"content-type", TEXT)]
        else:
            status, body, headers = 404, b"not found\n", [(b"content-type", TEXT)]
        headers += [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
        return status, headers, body

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while True:
                with trio.move_on_after(REQUEST_TIMEOUT) as timeout:
                    request = await _read_request(conn, stream)
                if timeout.cancelled_caught or request is None:
                    return
                headers = dict(request.headers)
                status, response_headers, body = await self.answer(
                    request.method, request.target, headers.get(b"accept", b"")
                )
                data = conn.send(
                    h11.Response(
                        status_code=status, headers=response_headers, reason=_REASONS[status]
                    )
                )
                if request.method != b"HEAD":
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


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    """The next request, its (ignored) body read through; None when the client closed."""
    request: h11.Request | None = None
    body = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(MAX_RECEIVE)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += len(event.data)
            if body > MAX_BODY:
                raise _Close
        elif isinstance(event, h11.EndOfMessage):
            return request
        else:  # ConnectionClosed
            return None
