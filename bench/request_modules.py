"""Our per-request sans-IO modules besides the HTTP/1.1 codec, in process: microseconds per call.

    PYTHONPATH=. .venv/bin/python bench/request_modules.py [--calls 20000] [--rounds 5]

What the proxy runs of each module for one request, with no sockets or trio, the request
and response as ``make bench`` sends them (wrk's GET, h2load's h2c GET, nginx's response),
with request IDs on: ``headers`` (the fields sent upstream and back to the client, and the
HTTP/2 response block), ``routing`` (the route of the request and its upstream target),
``request_checks`` (the checks of an HTTP/1.1 request and of an HTTP/2 request's fields),
``request_ids`` (a new ID), ``h2_server`` (h2's checks of a received block, its request head,
and the guard reading the frames), ``metrics`` (an exchange's record counted), ``accesslog``
(its access log line, JSON and combined). With ``PYTHONPATH=.`` it imports the working directory's
tree, so that a tree with modules compiled in place (mypyc) can be measured against another.
Each module's row prints which it ran: ``compiled`` or ``python``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import h2.events

from pooled_proxy import headers, request_ids, routing
from pooled_proxy.config import RouteConfig
from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.ops import accesslog, metrics
from pooled_proxy.protocol import h2_server, request_checks

WRK_FIELDS = [(b"host", b"127.0.0.1:8080")]
H2LOAD_BLOCK = [
    (b":method", b"GET"),
    (b":path", b"/"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:8080"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
]
NGINX_RESPONSE = [
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Sun, 06 Dec 2026 12:00:00 GMT"),
    (b"content-type", b"text/html"),
    (b"content-length", b"612"),
    (b"last-modified", b"Tue, 11 Apr 2023 01:45:34 GMT"),
    (b"connection", b"keep-alive"),
    (b"etag", b'"6434bbbe-264"'),
    (b"accept-ranges", b"bytes"),
]
ROUTES = [
    RouteConfig(upstream="api", host="api.example.com", path_prefix="/v1", strip_prefix=True),
    RouteConfig(upstream="static", path_prefix="/static/"),
    RouteConfig(upstream="backend", path_prefix="/"),
]
# One HEADERS frame of h2load's block (its HPACK bytes do not matter to the guard) and a
# WINDOW_UPDATE, as one read.
FRAMES = (
    (40).to_bytes(3, "big") + bytes([1, 5]) + (1).to_bytes(4, "big") + bytes(40)
    + (4).to_bytes(3, "big") + bytes([8, 0]) + bytes(4) + (65535).to_bytes(4, "big")
)  # fmt: skip


def _headers() -> None:
    up = headers.upstream_request_headers(
        WRK_FIELDS,
        host=b"127.0.0.1:8080",
        client_ip=b"127.0.0.1",
        scheme=b"http",
        protocol=b"1.1",
        request_id_header=b"x-request-id",
    )
    request_id = (b"x-request-id", up[-1][1])
    headers.client_response_headers(NGINX_RESPONSE, protocol=b"1.1", request_id=request_id)
    headers.h1_response_to_h2(200, NGINX_RESPONSE)


_ROUTER = routing.Router(ROUTES)


def _routing() -> None:
    route = _ROUTER.match(b"127.0.0.1:8080", b"/index.html")
    assert route is not None
    routing.rewrite_target(route, b"/index.html")


def _request_checks() -> None:
    request_checks.check_request(
        b"GET", b"/", b"127.0.0.1:8080", scheme=b"http", version=b"1.1", syntax_checked=True
    )
    request_checks.check_request(
        b"GET", b"/", b"127.0.0.1:8080", scheme=b"http", version=b"2", fields=H2LOAD_BLOCK[4:]
    )


def _request_ids() -> None:
    request_ids.choose_request_id(None)


_EVENT = h2.events.RequestReceived(stream_id=1, headers=H2LOAD_BLOCK)
_GUARD = h2_server.FrameGuard()
_GUARD.feed(h2_server.PREFACE, 0.0)


def _h2_server() -> None:
    _GUARD.feed(FRAMES, 0.0)
    h2_server.check_header_blocks([_EVENT], 0)
    h2_server.request_head(
        H2LOAD_BLOCK, end_stream=True, scheme=b"http", client_ip=b"127.0.0.1", max_header_count=100
    )


RECORD = ExchangeRecord(
    start=1.0,
    wall_start=1796558400.123,
    method=b"GET",
    target=b"/index.html",
    protocol=b"HTTP/1.1",
    client_ip=b"127.0.0.1",
    status=200,
    bytes_out=612,
    route="*/",
    route_upstream="backend",
    upstream_server="127.0.0.1:8081",
    upstream_reused=True,
    upstream_header_time=0.0002,
    ttfb=0.0003,
    duration=0.0004,
    request_id=b"5f0c1a2b3c4d5e6f00000001",
    request_headers=[(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk")],
)
_METRICS = metrics.ProxyMetrics()


def _metrics() -> None:
    _METRICS.observe(RECORD)


def _accesslog() -> None:
    accesslog.json_line(RECORD)
    accesslog.combined_line(RECORD)


ROWS: dict[str, tuple[Callable[[], None], object]] = {
    "headers": (_headers, headers),
    "routing": (_routing, routing),
    "request_checks": (_request_checks, request_checks),
    "request_ids": (_request_ids, request_ids),
    "h2_server": (_h2_server, h2_server),
    "metrics": (_metrics, metrics),
    "accesslog": (_accesslog, accesslog),
}


def run(call: Callable[[], None], count: int) -> float:
    """CPU microseconds per call over ``count`` calls (CPU time: on a machine others use,
    the time the process waits for a CPU would swamp what is measured)."""
    start = time.process_time()
    for _ in range(count):
        call()
    return (time.process_time() - start) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    args = parser.parse_args()
    for row in args.rows.split(","):
        call, module = ROWS[row]
        run(call, args.calls // 10)
        times = [run(call, args.calls) for _ in range(args.rounds)]
        built = "compiled" if str(getattr(module, "__file__", "")).endswith(".so") else "python"
        print(
            f"{row:15} {built:8} {statistics.median(times):6.2f} us per request (median CPU time)"
        )


if __name__ == "__main__":
    main()
