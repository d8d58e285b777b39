"""Prometheus metrics for one proxy, in a registry of its own (never the global one).

Two sources, so that serving traffic costs nothing beyond one observer call per exchange:

- **Per exchange** (:meth:`ProxyMetrics.observe`, an ``ExchangeRecord`` observer): request
  counts by route, upstream and status class, durations, upstream connect and response-header
  latency, bytes, the proxy's own error answers, stale-connection retries.
- **At scrape time** (:class:`ProxyCollector`): gauges and pool counters read from
  ``UpstreamPool.statistics()`` snapshots and the proxy's live counters, so the pools keep
  plain integers and nothing is pushed to Prometheus objects on the hot path.

All names start with ``pooled_proxy_``; README.md lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from .exchange import ExchangeRecord

if TYPE_CHECKING:
    from .proxy import Proxy

# Every reason pool.py closes a connection for; each is exported (at 0 if need be) so a
# dashboard or an alert can name a series before it first moves.
CLOSE_REASONS = (
    "idle_timeout",
    "keepalive_timeout",
    "error",
    "max_requests",
    "max_idle",
    "stale",
    "drain",
    "upstream_close",  # the upstream ended it after a complete response (Connection: close)
    "upgraded",  # it carried a WebSocket tunnel (101), which ended
)
PROTOCOLS = ("http/1.1", "h2")

# Whole exchanges: from a millisecond on a warm local upstream to a slow report.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Connects and response heads: usually well under a second, bounded by the timeouts.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class _Children:
    """A metric's label children, cached by label values: one dict lookup per exchange
    instead of ``labels()``'s validation and lock."""

    __slots__ = ("_metric", "_children")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def get(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


def status_class(status: int) -> str:
    """``"2xx"`` .. ``"5xx"``; ``"none"`` when the client got no status (it went away first)."""
    return f"{status // 100}xx" if status else "none"


class ProxyMetrics:
    """The metrics of one proxy: call :meth:`observe` with each finished exchange, and
    :meth:`bind` the proxy once it exists so the scrape-time gauges can read it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = _Children(Counter(
            "pooled_proxy_requests", "Exchanges finished, by route, upstream and status class.",
            ["route", "upstream", "status_class"], registry=r,
        ))  # fmt: skip
        self._duration = _Children(Histogram(
            "pooled_proxy_request_duration_seconds",
            "Request head received -> response finished; event streams are not included.",
            ["upstream"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self._ttfb = _Children(Histogram(
            "pooled_proxy_time_to_first_byte_seconds",
            "Request head received -> response head sent to the client.",
            ["upstream"], buckets=DURATION_BUCKETS, registry=r,
        ))  # fmt: skip
        self._connect = _Children(Histogram(
            "pooled_proxy_upstream_connect_duration_seconds",
            "Opening a new upstream connection (TCP, and TLS when the server is https).",
            ["upstream", "server"], buckets=LATENCY_BUCKETS, registry=r,
        ))  # fmt: skip
        self._header = _Children(Histogram(
            "pooled_proxy_upstream_response_header_duration_seconds",
            "Request fully sent upstream -> response head received.",
            ["upstream", "server"], buckets=LATENCY_BUCKETS, registry=r,
        ))  # fmt: skip
        self._bytes_in = _Children(Counter(
            "pooled_proxy_request_body_bytes", "Request body bytes received from clients.",
            ["upstream"], registry=r,
        ))  # fmt: skip
        self._bytes_out = _Children(Counter(
            "pooled_proxy_response_body_bytes", "Response body bytes sent to clients.",
            ["upstream"], registry=r,
        ))  # fmt: skip
        self._errors = _Children(Counter(
            "pooled_proxy_error_responses",
            "Exchanges that ended with a Proxy-Status error (the proxy's own 502/503/504/4xx "
            "answers, responses cut mid-stream, clients gone), by upstream server and status.",
            ["upstream", "server", "status", "error"], registry=r,
        ))  # fmt: skip
        self._retries = _Children(Counter(
            "pooled_proxy_upstream_stale_retries",
            "Requests retried on a new connection after a reused one turned out closed.",
            ["upstream", "server"], registry=r,
        ))  # fmt: skip
        self._event_streams = _Children(Counter(
            "pooled_proxy_event_streams",
            "Server-Sent Events responses relayed (finished ones; see _active for live ones).",
            ["upstream"], registry=r,
        ))  # fmt: skip
        self.collector: ProxyCollector | None = None

    def bind(self, proxy: Proxy) -> None:
        """Export the proxy's live state (pools, connections, drain) at scrape time."""
        if self.collector is not None:
            self.registry.unregister(self.collector)
        self.collector = ProxyCollector(proxy)
        self.registry.register(self.collector)

    def observe(self, record: ExchangeRecord) -> None:
        """The ``ExchangeRecord`` observer: runs once per exchange, on the event loop."""
        upstream = record.route_upstream
        server = record.upstream_server
        self._requests.get(record.route, upstream, status_class(record.status)).inc()
        if record.event_stream:
            self._event_streams.get(upstream).inc()
        else:
            self._duration.get(upstream).observe(record.duration)
        if record.ttfb is not None:
            self._ttfb.get(upstream).observe(record.ttfb)
        if record.connect_time is not None:
            self._connect.get(upstream, server).observe(record.connect_time)
        if record.upstream_header_time is not None:
            self._header.get(upstream, server).observe(record.upstream_header_time)
        if record.bytes_in:
            self._bytes_in.get(upstream).inc(record.bytes_in)
        if record.bytes_out:
            self._bytes_out.get(upstream).inc(record.bytes_out)
        if record.error:
            self._errors.get(upstream, server, str(record.status), record.error).inc()
        if record.retried:
            self._retries.get(upstream, server).inc()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type (Prometheus text, or OpenMetrics if asked)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class ProxyCollector(Collector):
    """Gauges and pool counters, read from the running proxy when Prometheus scrapes."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        forwarder = proxy.forwarder

        clients = GaugeMetricFamily(
            "pooled_proxy_client_connections",
            "Client connections being served, by protocol.",
            labels=["protocol"],
        )
        counts = proxy.connections_by_protocol
        for protocol in sorted({*PROTOCOLS, *counts}):
            clients.add_metric([protocol], counts[protocol])
        yield clients
        yield GaugeMetricFamily(
            "pooled_proxy_exchanges_in_flight", "Exchanges being served.",
            value=proxy.active_exchanges,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pooled_proxy_event_streams_active",
            "Server-Sent Events responses being relayed now.",
            value=forwarder.live.event_streams,
        )
        yield GaugeMetricFamily(
            "pooled_proxy_draining", "1 while the proxy drains (readyz answers 503).",
            value=1 if proxy.draining else 0,
        )  # fmt: skip

        labels = ["upstream", "server"]
        connections = GaugeMetricFamily(
            "pooled_proxy_upstream_connections",
            "Upstream connections by state: in_use, idle, connecting.",
            labels=[*labels, "state"],
        )
        opened = CounterMetricFamily(
            "pooled_proxy_upstream_connections_opened", "Upstream connections opened.",
            labels=labels,
        )  # fmt: skip
        reused = CounterMetricFamily(
            "pooled_proxy_upstream_connections_reused",
            "Exchanges served on a pooled (reused) connection.",
            labels=labels,
        )
        closed = CounterMetricFamily(
            "pooled_proxy_upstream_connections_closed",
            "Upstream connections closed, by reason.",
            labels=[*labels, "reason"],
        )
        queue = GaugeMetricFamily(
            "pooled_proxy_upstream_queue_length",
            "Requests waiting for a connection to this server.",
            labels=labels,
        )
        queue_wait = SummaryMetricFamily(
            "pooled_proxy_upstream_queue_wait_seconds",
            "Time requests spent in the wait queue (only requests that had to wait).",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            "pooled_proxy_upstream_queue_rejections",
            "Requests answered 503 by the wait queue: reason full or timeout.",
            labels=[*labels, "reason"],
        )
        healthy = GaugeMetricFamily(
            "pooled_proxy_upstream_server_healthy",
            "0 while passive health checks skip the server, else 1.",
            labels=labels,
        )
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # scraped outside the event loop (a test, a debugger)
            now = None
        for name, group in forwarder.upstreams.items():
            for pool, health in zip(group.pools, group.health):
                stats = pool.statistics()
                key = [name, str(pool.server)]
                connections.add_metric([*key, "in_use"], stats.in_use)
                connections.add_metric([*key, "idle"], stats.idle)
                connections.add_metric([*key, "connecting"], stats.connecting)
                opened.add_metric(key, stats.opened)
                reused.add_metric(key, stats.reused)
                for reason in sorted({*CLOSE_REASONS, *stats.closed}):
                    closed.add_metric([*key, reason], stats.closed.get(reason, 0))
                queue.add_metric(key, stats.waiting)
                queue_wait.add_metric(key, stats.queue_waits, stats.queue_wait_seconds)
                rejected.add_metric([*key, "full"], stats.queue_rejected)
                rejected.add_metric([*key, "timeout"], stats.queue_timeouts)
                if now is not None:
                    healthy.add_metric(key, 1 if health.is_up(now) else 0)
        yield from (connections, opened, reused, closed, queue, queue_wait, rejected, healthy)
