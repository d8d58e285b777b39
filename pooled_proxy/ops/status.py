"""What the admin's status endpoints show, read from the running proxy's own state.

- ``/upstreams``: each upstream and each of its servers: passive health (and why a server is
  skipped), pool occupancy and wait queue, requests and errors by kind.
- ``/config``: the running config, with its generation and file.
- ``/status`` (and ``/events``, one every sample): all of that for the status page, plus the
  client connections, live event streams and tunnels, the drain state and the request rates
  of the last minutes.

Nothing here runs per request: pools, passive health and metric counters are read when an
admin request asks, and the rate history is one reading of two counters per sample
(:meth:`StatusBoard.run_sampler`, once a second) kept in a bounded ring.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import trio

from .. import __version__
from ..config import Config, ServerAddress
from ..proxy import Proxy
from ..upstream.balancer import UpstreamGroup
from .metrics import ProxyMetrics

SAMPLE_INTERVAL = 1.0  # seconds between two samples of the request counters
HISTORY_SAMPLES = 300  # five minutes at one sample a second

JsonObject = dict[str, Any]


class StatusSource(Protocol):
    """What the admin's status endpoints read: one proxy's :class:`StatusBoard`, or the
    supervisor's view of its workers. ``ticks`` counts samples; ``next_tick`` waits for one."""

    @property
    def ticks(self) -> int: ...

    async def next_tick(self) -> None: ...

    async def status(self) -> JsonObject: ...

    async def config(self) -> JsonObject: ...


class Sample(NamedTuple):
    at: float  # wall clock (time.time()), for the chart's time axis
    clock: float  # trio's clock, for the rate (the wall clock may jump)
    requests: float  # exchanges finished so far
    server_errors: float  # of which answered 5xx


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _counts(values: Mapping[str, float]) -> dict[str, int]:
    return {key: int(value) for key, value in sorted(values.items())}


def _failures(count: int) -> str:
    return f"{count} failure" if count == 1 else f"{count} failures"


def config_json(value: object) -> Any:
    """A config (or any part of it) as JSON values: durations in seconds, addresses as
    ``host:port`` (``https://`` when TLS), file paths as strings. Only file paths are ever
    held in the config, never what the files contain (a TLS key stays on disk)."""
    if isinstance(value, ServerAddress):
        return f"https://{value}" if value.tls else str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {field.name: config_json(getattr(value, field.name)) for field in fields(value)}
    if isinstance(value, Mapping):
        return {str(key): config_json(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [config_json(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{type(value).__name__} in the config has no JSON form")


def server_health(group: UpstreamGroup, index: int, now: float) -> JsonObject:
    """A server's health, passive and active: whether the balancer picks it, and why not."""
    health = group.health[index]
    config = group.config
    # As UpstreamGroup.choose: the only server is never skipped; max_fails = 0 marks none down.
    checked = len(group.pools) > 1 and config.max_fails > 0
    down = checked and not health.is_up(now)
    recent = health.recent_failures(now)
    reason: str | None = None
    if down:
        reason = (
            f"{_failures(config.max_fails)} within {config.fail_window:g}s (max_fails): "
            f"skipped for {health.down_until - now:.1f}s more (fail_timeout {config.fail_timeout:g}s)"
        )
    elif recent:
        reason = f"{_failures(recent)} within {config.fail_window:g}s"
        if checked:
            reason += f", down at {config.max_fails} (max_fails)"
        elif config.max_fails == 0:
            reason += "; never skipped (passive health is off: max_fails = 0)"
        else:
            reason += "; never skipped (the upstream's only server)"
    probe = group.probes[index]
    if probe is not None and not probe.up:
        active = (
            f"failed {probe.config.fall} health check(s) in a row (fall): out until "
            f"{probe.config.rise} pass in a row (rise), {probe.streak} so far"
        )
        reason = f"{active}; {reason}" if reason else active
    last = health.last_failure
    in_rotation = group.in_rotation(index, now)
    return {
        "healthy": in_rotation,
        "state": "up" if in_rotation else "down",
        "reason": reason,
        "active_health": None
        if probe is None
        else {"up": probe.up, "results": dict(probe.results), "changes": dict(probe.changes)},
        "passive_health": checked,
        "recent_failures": recent,
        "down_for": round(health.down_until - now, 3) if down else None,
        "down_until": _iso(time.time() + health.down_until - now) if down else None,
        "last_failure": None
        if last is None
        else {"error": last[1], "detail": last[2], "seconds_ago": round(now - last[0], 3)},
    }


def _server(
    group: UpstreamGroup,
    index: int,
    errors: Mapping[str, float],
    now: float,
) -> JsonObject:
    pool = group.pools[index]
    stats = pool.statistics()
    config = group.config
    return {
        "address": str(pool.server),
        "tls": pool.server.tls,
        "health": server_health(group, index, now),
        "pool": {
            "in_use": stats.in_use,
            "idle": stats.idle,
            "connecting": stats.connecting,
            "queued": stats.waiting,
            "max_connections": config.max_connections,
            "max_idle": config.max_idle,
            "queue_size": config.queue_size,
        },
        # Every exchange takes a connection from the pool, a new one or a reused one.
        "requests": stats.opened + stats.reused,
        "connections": {
            "opened": stats.opened,
            "reused": stats.reused,
            "closed": _counts(stats.closed),
        },
        "queue": {
            "rejected_full": stats.queue_rejected,
            "timed_out": stats.queue_timeouts,
            "waited": stats.queue_waits,
            "wait_seconds": round(stats.queue_wait_seconds, 3),
        },
        "errors": _counts(errors),
    }


class StatusBoard:
    """The status of one proxy (the process that answers), and its request-rate history."""

    def __init__(
        self,
        proxy: Proxy,
        metrics: ProxyMetrics,
        *,
        interval: float = SAMPLE_INTERVAL,
        history: int = HISTORY_SAMPLES,
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.interval = interval
        self.started_at = time.time()
        # One more sample than rates: each rate is the difference of two.
        self.samples: deque[Sample] = deque(maxlen=history + 1)
        self.ticks = 0
        self._ticked = trio.Event()

    # -- sampling ------------------------------------------------------------------------------

    def sample(self) -> None:
        requests, server_errors = self.metrics.request_totals()
        self.samples.append(Sample(time.time(), trio.current_time(), requests, server_errors))

    async def run_sampler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sample the counters every ``interval`` until cancelled; wake ``next_tick`` waiters."""
        next_at = trio.current_time()
        while True:
            self.sample()
            self.ticks += 1
            self._ticked.set()
            self._ticked = trio.Event()
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            next_at += self.interval
            await trio.sleep_until(max(next_at, trio.current_time()))

    async def next_tick(self) -> None:
        await self._ticked.wait()

    def rates(self) -> list[list[float]]:
        """``[at, requests/s, 5xx/s]`` between each two consecutive samples, oldest first."""
        points: list[list[float]] = []
        previous: Sample | None = None
        for sample in self.samples:
            if previous is not None:
                elapsed = sample.clock - previous.clock
                if elapsed > 0:
                    points.append([
                        round(sample.at, 3),
                        round((sample.requests - previous.requests) / elapsed, 3),
                        round((sample.server_errors - previous.server_errors) / elapsed, 3),
                    ])  # fmt: skip
            previous = sample
        return points

    # -- what the endpoints answer ---------------------------------------------------------

    async def status(self) -> JsonObject:
        return self.snapshot()

    async def config(self) -> JsonObject:
        config: Config = self.proxy.config
        return {
            "generation": self.proxy.reloads + 1,
            "file": str(config.path) if config.path is not None else None,
            "loaded_at": _iso(self.proxy.config_loaded_at),
            "config": config_json(config),
        }

    def upstreams(self) -> list[JsonObject]:
        now = trio.current_time()
        requests = self.metrics.requests_by_upstream()
        errors = self.metrics.errors_by_server()
        routes = self.proxy.config.routes
        answer = []
        for name, group in self.proxy.forwarder.upstreams.items():
            upstream_errors: dict[str, float] = {}
            for (upstream, _), by_error in errors.items():
                if upstream == name:
                    for error, count in by_error.items():
                        upstream_errors[error] = upstream_errors.get(error, 0.0) + count
            by_status = requests.get(name, {})
            answer.append({
                "name": name,
                "balance": group.config.balance,
                "routes": [
                    (route.host or "*") + route.path_prefix
                    for route in routes
                    if route.upstream == name
                ],
                "requests": {
                    "total": int(sum(by_status.values())),
                    "by_status": _counts(by_status),
                },
                "errors": _counts(upstream_errors),
                "servers": [
                    _server(group, index, errors.get((name, str(pool.server)), {}), now)
                    for index, pool in enumerate(group.pools)
                ],
            })  # fmt: skip
        return answer

    def snapshot(self) -> JsonObject:
        """Everything /status shows, now."""
        proxy = self.proxy
        config = proxy.config
        draining: JsonObject | None = None
        if proxy.drain_started_at is not None:
            draining = {
                "seconds": round(trio.current_time() - proxy.drain_started_at, 3),
                "drain_timeout": config.server.drain_timeout,
            }
        requests, server_errors = self.metrics.request_totals()
        return {
            "process": self._process(),
            "generation": proxy.reloads + 1,
            "config_file": str(config.path) if config.path is not None else None,
            "config_loaded_at": _iso(proxy.config_loaded_at),
            "draining": draining,
            "clients": {
                "total": proxy.client_connections,
                "by_protocol": {
                    protocol: count
                    for protocol, count in sorted(proxy.connections_by_protocol.items())
                    if count  # a protocol whose connections all closed stays in the Counter
                },
            },
            "exchanges_in_flight": proxy.active_exchanges,
            "event_streams": proxy.forwarder.live.event_streams,
            "websocket_tunnels": proxy.forwarder.live.tunnels,
            "requests": {"total": int(requests), "server_errors": int(server_errors)},
            "history": {
                "interval": self.interval,
                "columns": ["at", "requests_per_second", "server_errors_per_second"],
                "points": self.rates(),
            },
            "upstreams": self.upstreams(),
        }

    def report(self) -> bytes:
        """The snapshot a worker sends the supervisor (GroupStatus) when asked."""
        return json.dumps(self.snapshot(), separators=(",", ":")).encode()

    def _process(self) -> JsonObject:
        return {
            "version": __version__,
            "pid": os.getpid(),
            # With several workers, each has its own pools and counters: this is one of them.
            "workers": self.proxy.config.server.workers,
            "started_at": _iso(self.started_at),
            "uptime": round(time.time() - self.started_at, 3),
        }


def json_body(value: object) -> bytes:
    body = json.dumps(value, indent=2, allow_nan=False)
    return body.encode() + b"\n"


# -- a group of workers (server.workers > 1) ---------------------------------------------------


class WorkerGroup(Protocol):
    """What :class:`GroupStatus` needs of the supervisor."""

    @property
    def config(self) -> Config: ...

    @property
    def generation(self) -> int: ...

    @property
    def config_loaded_at(self) -> float: ...

    async def worker_statuses(self) -> list[tuple[int, JsonObject]]:
        """(worker index, its :meth:`StatusBoard.snapshot`) of each worker that answered."""
        ...


def _add(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping):
            _add(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def _merged_health(healths: list[tuple[int, JsonObject]]) -> JsonObject:
    """One server's health over the workers: each keeps its own passive health."""
    down = [index for index, health in healths if not health["healthy"]]
    failures = [
        (health["last_failure"], index) for index, health in healths if health["last_failure"]
    ]
    last = min(failures, key=lambda pair: pair[0]["seconds_ago"], default=None)
    reasons = [
        f"worker {index}: {health['reason']}" for index, health in healths if health["reason"]
    ]
    down_for = [health["down_for"] for _, health in healths if health["down_for"] is not None]
    down_until = [health["down_until"] for _, health in healths if health["down_until"]]
    return {
        "healthy": not down,
        "state": "up" if not down else "down" if len(down) == len(healths) else "partly_down",
        "reason": "; ".join(reasons) or None,
        "down_in": down,  # worker indices
        "passive_health": any(health["passive_health"] for _, health in healths),
        "recent_failures": sum(health["recent_failures"] for _, health in healths),
        "down_for": max(down_for, default=None),
        "down_until": max(down_until, default=None),
        "last_failure": None if last is None else {**last[0], "worker": last[1]},
    }


def _merged_upstreams(reports: list[tuple[int, JsonObject]]) -> list[JsonObject]:
    upstreams: dict[str, JsonObject] = {}
    healths: dict[tuple[str, str], list[tuple[int, JsonObject]]] = {}
    for index, report in reports:
        for upstream in report["upstreams"]:
            merged = upstreams.setdefault(
                upstream["name"],
                {**upstream, "requests": {}, "errors": {}, "servers": []},
            )
            _add(merged["requests"], upstream["requests"])
            _add(merged["errors"], upstream["errors"])
            servers = {server["address"]: server for server in merged["servers"]}
            for server in upstream["servers"]:
                into = servers.get(server["address"])
                if into is None:
                    into = {"address": server["address"], "tls": server["tls"], "health": None}
                    merged["servers"].append(into)
                _add(
                    into, {k: v for k, v in server.items() if k not in ("address", "tls", "health")}
                )
                healths.setdefault((upstream["name"], server["address"]), []).append(
                    (index, server["health"])
                )
    for name, upstream in upstreams.items():
        for server in upstream["servers"]:
            server["health"] = _merged_health(healths[name, server["address"]])
    return list(upstreams.values())


def _merged_history(reports: list[tuple[int, JsonObject]]) -> JsonObject:
    """The workers' rates summed, newest with newest: each samples once a second on its own."""
    histories = [report["history"] for _, report in reports]
    longest = max((len(history["points"]) for history in histories), default=0)
    points: list[list[float]] = []
    for back in range(longest, 0, -1):
        at, requests, errors = 0.0, 0.0, 0.0
        for history in histories:
            if len(history["points"]) >= back:
                point = history["points"][-back]
                at = max(at, point[0])
                requests += point[1]
                errors += point[2]
        points.append([at, round(requests, 3), round(errors, 3)])
    first = histories[0] if histories else {"interval": SAMPLE_INTERVAL, "columns": []}
    return {"interval": first["interval"], "columns": first["columns"], "points": points}


def merge_statuses(reports: list[tuple[int, JsonObject]]) -> JsonObject:
    """The workers' statuses as one: counts and pools summed, health per worker."""
    clients: dict[str, Any] = {"total": 0, "by_protocol": {}}
    requests: dict[str, Any] = {}
    drains = [report["draining"] for _, report in reports if report["draining"]]
    for _, report in reports:
        _add(clients, report["clients"])
        _add(requests, report["requests"])
    return {
        "draining": max(drains, key=lambda drain: drain["seconds"], default=None),
        "clients": clients,
        "exchanges_in_flight": sum(report["exchanges_in_flight"] for _, report in reports),
        "event_streams": sum(report["event_streams"] for _, report in reports),
        "websocket_tunnels": sum(report["websocket_tunnels"] for _, report in reports),
        "requests": requests or {"total": 0, "server_errors": 0},
        "history": _merged_history(reports),
        "upstreams": _merged_upstreams(reports),
    }


class GroupStatus:
    """The supervisor's status: every worker's, asked for when someone looks (once per
    sample for all /events viewers) and merged. Each worker samples its own rates."""

    def __init__(self, group: WorkerGroup, *, interval: float = SAMPLE_INTERVAL) -> None:
        self.group = group
        self.interval = interval
        self.started_at = time.time()
        self.ticks = 0
        self._ticked = trio.Event()

    async def run_sampler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Only a clock for the /events viewers: the workers keep the history."""
        task_status.started()
        while True:
            self.ticks += 1
            self._ticked.set()
            self._ticked = trio.Event()
            await trio.sleep(self.interval)

    async def next_tick(self) -> None:
        await self._ticked.wait()

    async def status(self) -> JsonObject:
        reports = await self.group.worker_statuses()
        group = self.group
        config = group.config
        return {
            "process": {
                "version": __version__,
                "pid": os.getpid(),
                "workers": config.server.workers,
                "worker_pids": {str(i): report["process"]["pid"] for i, report in reports},
                "started_at": _iso(self.started_at),
                "uptime": round(time.time() - self.started_at, 3),
            },
            "generation": group.generation,
            "config_file": str(config.path) if config.path is not None else None,
            "config_loaded_at": _iso(group.config_loaded_at),
            **merge_statuses(reports),
        }

    async def config(self) -> JsonObject:
        config = self.group.config
        return {
            "generation": self.group.generation,
            "file": str(config.path) if config.path is not None else None,
            "loaded_at": _iso(self.group.config_loaded_at),
            "config": config_json(config),
        }
