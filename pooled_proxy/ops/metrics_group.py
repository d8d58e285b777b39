"""``/metrics`` of a process group (``server.workers > 1``): the supervisor's scrape is the sum
of every worker's registry, gathered when Prometheus scrapes.

Why gathered, not shared memory: prometheus_client's multiprocess mode keeps every value in
a memory-mapped file, so each increment on the request path becomes a locked write to the
map, and it cannot carry the collectors that read the pools at scrape time. Here each
worker keeps its plain counters (metrics.py) and, asked by the supervisor over a private
socket pair, sends its families as JSON (:func:`report`); nothing changes per request.

How the families combine, as Prometheus' conventions for multi-process servers go:

- counters, histograms and summaries of the proxy are summed over the workers (``_created``
  is the earliest); a worker that dies leaves its last reported counts in the sum
  (:meth:`GroupMetrics.retire`), so the group's counters never go back when one restarts;
- gauges are summed, except :data:`~.metrics.MIN_GAUGES` (the minimum) and
  :data:`~.metrics.PER_WORKER_GAUGES`, which stay one series per worker;
- ``process_*`` and ``python_*`` describe one process: one series per process, labelled
  ``worker="0"``, ``"1"``, ... and ``worker="supervisor"`` for the supervisor itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from .metrics import (
    MIN_GAUGES,
    PER_WORKER_GAUGES,
    ReloadState,
    register_process_collectors,
    runtime_families,
)

OWN_PREFIX = "pooled_proxy_"
WORKER_LABEL = "worker"
SUPERVISOR = "supervisor"
_SUMMED_TYPES = ("counter", "histogram", "summary", "gaugehistogram")

Report = list[dict[str, Any]]  # one process's families, as JSON has them
_Key = tuple[str, tuple[tuple[str, str], ...]]  # a sample's name and its sorted labels


def families(registry: CollectorRegistry) -> Report:
    """The families of ``registry`` in the report's form."""
    return [
        {
            "name": family.name,
            "help": family.documentation,
            "type": family.type,
            "unit": family.unit,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
        for family in registry.collect()
    ]


def report(registry: CollectorRegistry) -> bytes:
    """What a worker sends the supervisor when asked for its metrics."""
    return json.dumps(families(registry), separators=(",", ":")).encode()


def _per_process(name: str) -> bool:
    return not name.startswith(OWN_PREFIX) or name in PER_WORKER_GAUGES


def _takes_minimum(family: dict[str, Any], sample_name: str) -> bool:
    if family["type"] in _SUMMED_TYPES:
        return bool(sample_name == family["name"] + "_created")
    return family["name"] in MIN_GAUGES


class _Merge:
    """Families in the order first seen, each with its combined samples."""

    def __init__(self) -> None:
        self.families: dict[str, dict[str, Any]] = {}
        self.values: dict[str, dict[_Key, float]] = {}

    def _fold(self, family: dict[str, Any], key: _Key, value: float) -> None:
        name = family["name"]
        self.families.setdefault(name, family)
        values = self.values.setdefault(name, {})
        before = values.get(key)
        if before is None:
            values[key] = value
        elif _takes_minimum(family, key[0]):
            values[key] = min(before, value)
        else:
            values[key] = before + value

    def add(self, report: Report, process: str) -> None:
        """Fold in the families of one process; ``process`` labels its per-process series."""
        for family in report:
            per_process = _per_process(family["name"])
            for sample_name, labels, value in family["samples"]:
                if per_process:
                    labels = {**labels, WORKER_LABEL: process}
                self._fold(family, (sample_name, tuple(sorted(labels.items()))), value)

    def add_counts(self, report: Report) -> None:
        """Fold in the counters, histograms and summaries of ``report`` that are summed over
        the group (a worker's last counts when it exited)."""
        for family in report:
            if family["type"] in _SUMMED_TYPES and not _per_process(family["name"]):
                for sample_name, labels, value in family["samples"]:
                    self._fold(family, (sample_name, tuple(sorted(labels.items()))), value)

    def add_merge(self, other: _Merge) -> None:
        for name, family in other.families.items():
            for key, value in other.values[name].items():
                self._fold(family, key, value)

    def metrics(self) -> list[Metric]:
        out = []
        for name, family in self.families.items():
            metric = Metric(name, family["help"], family["type"], family["unit"])
            for (sample_name, labels), value in self.values[name].items():
                metric.samples.append(Sample(sample_name, dict(labels), value))
            out.append(metric)
        return out


class _RuntimeCollector(Collector):
    def __init__(self, state: ReloadState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        return runtime_families(self.state)


class GroupMetrics(Collector):
    """The supervisor's metrics: its own process and reload state merged with the reports
    of its workers (given to :meth:`exposition`) and the last counts of workers that exited
    (given to :meth:`retire`)."""

    def __init__(self, state: ReloadState) -> None:
        self._own = CollectorRegistry()
        register_process_collectors(self._own)
        self._own.register(_RuntimeCollector(state))
        self._retired = _Merge()
        self._reports: Sequence[tuple[str, Report]] = ()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def retire(self, last_report: Report) -> None:
        """A worker exited: its last reported counts stay in the group's sums."""
        self._retired.add_counts(last_report)

    def collect(self) -> Iterable[Metric]:
        merge = _Merge()
        merge.add(families(self._own), SUPERVISOR)
        for worker, report in self._reports:
            merge.add(report, worker)
        merge.add_merge(self._retired)
        return merge.metrics()

    def exposition(
        self, reports: Sequence[tuple[str, Report]], accept: str = ""
    ) -> tuple[bytes, str]:
        """The group's scrape body, with the workers' ``reports`` (worker label, families)."""
        self._reports = reports
        try:
            encoder, content_type = choose_encoder(accept)
            return encoder(self.registry), content_type
        finally:
            self._reports = ()
