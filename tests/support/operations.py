"""Test tools for the operations side: a proxy with metrics, admin listener and access log on
127.0.0.1 port 0, and a /metrics scrape parsed with ``prometheus_client.parser``."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from pooled_proxy.config import Config, InspectConfig, ServerAddress
from pooled_proxy.ops.accesslog import AccessLog
from pooled_proxy.ops.admin import AdminServer
from pooled_proxy.ops.inspector.endpoints import InspectorEndpoints
from pooled_proxy.ops.inspector.recorder import Inspector
from pooled_proxy.ops.inspector.replay import Replayer
from pooled_proxy.ops.metrics import ProxyMetrics
from pooled_proxy.ops.status import SAMPLE_INTERVAL, StatusBoard
from tests.support.helpers import HOST, RunningProxy, start_proxy


@dataclass
class OperatedProxy:
    running: RunningProxy
    metrics: ProxyMetrics
    admin: AdminServer
    log: io.StringIO
    access_log: AccessLog
    inspector: Inspector | None = None

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def admin_url(self) -> str:
        assert self.admin.address is not None
        return f"http://{HOST}:{self.admin.address.port}"

    async def scrape(self) -> Scrape:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.admin_url + "/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return Scrape.parse(response.text)

    def log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


async def start_operated_proxy(
    nursery: trio.Nursery,
    config: Config,
    *,
    log_format: str = "json",
    sample_interval: float = SAMPLE_INTERVAL,
    inspect: InspectConfig | None = None,
) -> OperatedProxy:
    """The proxy as ``pooled-proxy run`` assembles it, with the access log in memory, and the
    request inspector with ``inspect``."""
    metrics = ProxyMetrics()
    log = io.StringIO()
    access_log = AccessLog(log, log_format)
    inspector = Inspector(inspect) if inspect is not None else None
    running = await start_proxy(
        nursery, config, observers=(metrics.observe, access_log), tap=inspector
    )
    metrics.bind(running.proxy)
    board = StatusBoard(running.proxy, metrics, interval=sample_interval)
    await nursery.start(board.run_sampler)
    routes = None
    if inspector is not None:
        replayer = Replayer(running.proxy, inspector)
        await nursery.start(replayer.run)
        routes = InspectorEndpoints(inspector, replayer)
    admin = AdminServer(running.proxy, metrics, ServerAddress(HOST, 0), status=board, routes=routes)
    await nursery.start(admin.serve)
    return OperatedProxy(running, metrics, admin, log, access_log, inspector)


class Scrape:
    """Samples of one scrape; ``value(name, **labels)`` sums the samples whose labels include
    the given ones (0.0 when there is none)."""

    def __init__(self, samples: list[tuple[str, dict[str, str], float]], types: dict[str, str]):
        self.samples = samples
        self.types = types

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = []
        types = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for sample in family.samples:
                samples.append((sample.name, dict(sample.labels), sample.value))
        return cls(samples, types)

    def value(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            sample_name == name and labels.items() <= sample_labels.items()
            for sample_name, sample_labels, _ in self.samples
        )
