"""Prometheus metrics for one proxy, in a registry of its own (never the global one).

Two sources, so that serving traffic costs nothing beyond one observer call per exchange:

- **Per exchange** (:meth:`ProxyMetrics.observe`, an ``ExchangeRecord`` observer): request
  counts by route, upstream and status class, durations, upstream connect and response-header
  latency, bytes, the proxy's own error answers, stale-connection retries, servers left
  for the next one. They are kept as plain numbers (a dict lookup and an add; a bisect for
  a histogram) and turned into metric families when Prometheus scrapes: prometheus_client's
  own Counter and Histogram take a lock per value they touch, which cost the proxy several
  microseconds per exchange.
- **At scrape time** (:class:`ProxyCollector`): gauges and pool counters read from
  ``UpstreamPool.statistics()`` snapshots and the proxy's live counters, so the pools keep
  plain integers and nothing is pushed to Prometheus objects on the hot path; the build and
  config-reload gauges; and prometheus_client's process, platform and GC collectors
  (``process_*``, ``python_*``).

All names of the proxy's own start with ``pooled_proxy_``; README.md lists them. With
``workers > 1`` the supervisor sums the workers' registries (metrics_group.py):
:data:`PER_WORKER_GAUGES` and :data:`MIN_GAUGES` say how the gauges that are not summed
combine.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import prometheus_client.metrics
import trio
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .. import __version__
from .._compiled import codec, h11_library
from ..exchange import ExchangeRecord
from ..proxy import PENDING
from ..upstream.health import PROBE_RESULTS

if TYPE_CHECKING:
    from ..proxy import Proxy

# Every reason pool.py closes a connection for; each is exported (at 0 if need be) so a
# dashboard or an alert can name a series before it first moves.
CLOSE_REASONS = (
    "idle_timeout",
    "keepalive_timeout",
    "learned_timeout",  # retired before the server's unannounced idle timeout, as learned
    "error",
    "max_requests",
    "max_idle",
    "stale",
    "drain",
    "upstream_close",  # the upstream ended it after a complete response (Connection: close)
    "upgraded",  # it carried a WebSocket tunnel (101), which ended
)
PROTOCOLS = ("http/1.1", "h2", PENDING)

# How the supervisor combines gauges of several workers; the others are summed (connections,
# exchanges, queue lengths add up). These are states of one process, kept one series per
# worker with a ``worker`` label (as are the process_* and python_* series):
PER_WORKER_GAUGES = frozenset({"pooled_proxy_draining", "pooled_proxy_upstream_server_healthy"})
# and these hold for the group only if they hold for every process: a reload failed if it
# failed anywhere, the group runs a config loaded no earlier than its oldest load.
MIN_GAUGES = frozenset({
    "pooled_proxy_build_info",
    "pooled_proxy_config_last_reload_success",
    "pooled_proxy_config_last_reload_success_timestamp_seconds",
})  # fmt: skip

# Whole exchanges: from a millisecond on a warm local upstream to a slow report.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# Connects and response heads: usually well under a second, bounded by the timeouts.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


def _created_series() -> bool:
    # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class _Counter:
    """A labelled counter as plain numbers, exported as a ``CounterMetricFamily``."""

    __slots__ = ("created", "documentation", "labelnames", "name", "values")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        value = self.values.get(labels)
        if value is None:
            self.created[labels] = time.time()
            value = 0.0
        self.values[labels] = value + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for labels, value in self.values.items():
            family.add_metric(labels, value, created=self.created[labels] if created else None)
        return family


class _Histogram:
    """A labelled histogram as plain numbers (a count per bucket, not cumulative, and a sum),
    exported as a ``HistogramMetricFamily`` with the samples prometheus_client's Histogram has."""

    __slots__ = ("bounds", "documentation", "labelnames", "name", "series")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = (*buckets, math.inf)
        # labels -> [count in bucket 0, ..., count in +Inf, sum, created]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * len(self.bounds) + [0.0, time.time()]
        series[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= bound
        series[-2] += value

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for labels, series in self.series.items():
            buckets = []
            total = 0.0
            for bound, count in zip(self.bounds, series):
                total += count
                buckets.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
            family.add_metric(labels, buckets, sum_value=series[-2])
            if created:
                family.samples.append(
                    Sample(self.name + "_created", dict(zip(self.labelnames, labels)), series[-1])
                )
        return family


class _ExchangeCollector(Collector):
    """Exports the per-exchange metrics in the order they were declared."""

    def __init__(self, metrics: Sequence[_Counter | _Histogram]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return [metric.family() for metric in self.metrics]


def status_class(status: int) -> str:
    """``"2xx"`` .. ``"5xx"``; ``"none"`` when the client got no status (it went away first)."""
    return f"{status // 100}xx" if status else "none"


class ReloadState(Protocol):
    """What the reload gauges read: the proxy's, or the supervisor's with workers."""

    @property
    def last_reload_ok(self) -> bool: ...

    @property
    def config_loaded_at(self) -> float: ...


def runtime_families(state: ReloadState) -> list[Metric]:
    """``pooled_proxy_build_info`` and the config reload gauges of ``state``."""
    build = GaugeMetricFamily(
        "pooled_proxy_build_info",
        "Always 1; the version of pooled-proxy running, its HTTP/1.1 codec (compiled, pure or"
        " mixed) and h11 library (h11-mypyc or h11).",
        labels=["version", "codec", "h11"],
    )  # fmt: skip
    build.add_metric([__version__, codec(), h11_library()], 1)
    return [
        build,
        GaugeMetricFamily(
            "pooled_proxy_config_last_reload_success",
            "1 if the last config reload (SIGHUP, --watch) succeeded or none was tried, else 0.",
            value=1 if state.last_reload_ok else 0,
        ),
        GaugeMetricFamily(
            "pooled_proxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (the start counts as one).",
            value=state.config_loaded_at,
        ),
    ]


def register_process_collectors(registry: CollectorRegistry) -> None:
    """prometheus_client's default collectors (process_*, python_*), in ``registry``."""
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)


class ProxyMetrics:
    """The metrics of one proxy: call :meth:`observe` with each finished exchange, and
    :meth:`bind` the proxy once it exists so the scrape-time gauges can read it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _Counter(
            "pooled_proxy_requests",
            "Exchanges finished, by route, upstream and status class.",
            ["route", "upstream", "status_class"],
        )
        self._duration = _Histogram(
            "pooled_proxy_request_duration_seconds",
            "Request head received -> response finished; event streams are not included.",
            ["upstream"], DURATION_BUCKETS,
        )  # fmt: skip
        self._ttfb = _Histogram(
            "pooled_proxy_time_to_first_byte_seconds",
            "Request head received -> response head sent to the client.",
            ["upstream"], DURATION_BUCKETS,
        )  # fmt: skip
        self._connect = _Histogram(
            "pooled_proxy_upstream_connect_duration_seconds",
            "Opening a new upstream connection (TCP, and TLS when the server is https).",
            ["upstream", "server"], LATENCY_BUCKETS,
        )  # fmt: skip
        self._header = _Histogram(
            "pooled_proxy_upstream_response_header_duration_seconds",
            "Request fully sent upstream -> response head received.",
            ["upstream", "server"], LATENCY_BUCKETS,
        )  # fmt: skip
        self._bytes_in = _Counter(
            "pooled_proxy_request_body_bytes", "Request body bytes received from clients.",
            ["upstream"],
        )  # fmt: skip
        self._bytes_out = _Counter(
            "pooled_proxy_response_body_bytes", "Response body bytes sent to clients.",
            ["upstream"],
        )  # fmt: skip
        self._errors = _Counter(
            "pooled_proxy_error_responses",
            "Exchanges that ended with a Proxy-Status error (the proxy's own 502/503/504/4xx "
            "answers, responses cut mid-stream, clients gone), by upstream server and status.",
            ["upstream", "server", "status", "error"],
        )
        self._retries = _Counter(
            "pooled_proxy_upstream_stale_retries",
            "Requests retried on a new connection after a reused one turned out closed.",
            ["upstream", "server"],
        )
        self._next_server = _Counter(
            "pooled_proxy_upstream_next_server",
            "Requests that went on to another server (an upstream's only server: to a new "
            "connection to it) after this one failed before anything was answered, by the "
            "failure (the Proxy-Status error).",
            ["upstream", "server", "reason"],
        )
        self._event_streams = _Counter(
            "pooled_proxy_event_streams",
            "Server-Sent Events responses relayed (finished ones; see _active for live ones).",
            ["upstream"],
        )
        self.registry.register(_ExchangeCollector((
            self._requests, self._duration, self._ttfb, self._connect, self._header,
            self._bytes_in, self._bytes_out, self._errors, self._retries, self._next_server,
            self._event_streams,
        )))  # fmt: skip
        register_process_collectors(self.registry)
        self.collector: ProxyCollector | None = None

    def bind(self, proxy: Proxy) -> None:
        """Export the proxy's live state (pools, connections, drain) at scrape time."""
        if self.collector is not None:
            self.registry.unregister(self.collector)
        self.collector = ProxyCollector(proxy)
        self.registry.register(self.collector)

    def observe(self, record: ExchangeRecord) -> None:
        """The ``ExchangeRecord`` observer: runs once per exchange, on the event loop."""
        upstream = (record.route_upstream,)
        self._requests.inc((record.route, record.route_upstream, status_class(record.status)))
        if record.event_stream:
            self._event_streams.inc(upstream)
        else:
            self._duration.observe(upstream, record.duration)
        if record.ttfb is not None:
            self._ttfb.observe(upstream, record.ttfb)
        if record.connect_time is not None:
            self._connect.observe(
                (record.route_upstream, record.upstream_server), record.connect_time
            )
        if record.upstream_header_time is not None:
            self._header.observe(
                (record.route_upstream, record.upstream_server), record.upstream_header_time
            )
        if record.bytes_in:
            self._bytes_in.inc(upstream, record.bytes_in)
        if record.bytes_out:
            self._bytes_out.inc(upstream, record.bytes_out)
        if record.error:
            self._errors.inc(
                (record.route_upstream, record.upstream_server, str(record.status), record.error)
            )
        if record.retried:
            self._retries.inc((record.route_upstream, record.upstream_server))
        for server, error in record.servers_failed:
            self._next_server.inc((record.route_upstream, server, error))

    # Read by the admin's status endpoints: once a second, and per admin request.

    def request_totals(self) -> tuple[float, float]:
        """Exchanges finished so far, and how many of them were answered with a 5xx."""
        total = server_errors = 0.0
        for (_, _, status), count in self._requests.values.items():
            total += count
            if status == "5xx":
                server_errors += count
        return total, server_errors

    def requests_by_upstream(self) -> dict[str, dict[str, float]]:
        """upstream -> status class -> exchanges finished."""
        counts: dict[str, dict[str, float]] = {}
        for (_, upstream, status), count in self._requests.values.items():
            by_status = counts.setdefault(upstream, {})
            by_status[status] = by_status.get(status, 0.0) + count
        return counts

    def errors_by_server(self) -> dict[tuple[str, str], dict[str, float]]:
        """(upstream, server) -> Proxy-Status error -> exchanges that ended with it; the
        server is "" for an error before one was chosen."""
        counts: dict[tuple[str, str], dict[str, float]] = {}
        for (upstream, server, _, error), count in self._errors.values.items():
            by_error = counts.setdefault((upstream, server), {})
            by_error[error] = by_error.get(error, 0.0) + count
        return counts

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type (Prometheus text, or OpenMetrics if asked)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """:meth:`exposition`, as the admin server asks for it."""
        return self.exposition(accept)


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
            "Open client connections, by protocol (pending: TLS handshake or first bytes awaited).",
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
        yield from runtime_families(proxy)

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
            "1 while the server is in rotation, 0 while passive or active health checks "
            "take it out.",
            labels=labels,
        )
        probes = CounterMetricFamily(
            "pooled_proxy_upstream_health_probes",
            "Active health probes, by result: pass, status (unexpected status), timeout, "
            "connect_error, error (a broken response).",
            labels=[*labels, "result"],
        )
        changes = CounterMetricFamily(
            "pooled_proxy_upstream_health_changes",
            "Times active health checks took the server out of rotation (state down) or "
            "brought it back (state up).",
            labels=[*labels, "state"],
        )
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # scraped outside the event loop (a test, a debugger)
            now = None
        for name, group in forwarder.upstreams.items():
            for index, (pool, probe) in enumerate(zip(group.pools, group.probes)):
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
                    healthy.add_metric(key, 1 if group.in_rotation(index, now) else 0)
                if probe is not None:
                    for result in PROBE_RESULTS:
                        probes.add_metric([*key, result], probe.results[result])
                    for state in ("down", "up"):
                        changes.add_metric([*key, state], probe.changes[state])
        yield from (connections, opened, reused, closed, queue, queue_wait, rejected, healthy)
        yield from (probes, changes)
