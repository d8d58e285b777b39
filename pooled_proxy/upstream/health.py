"""Active health checks: one prober per server of an upstream with ``health_check``.

Each probe is ``GET path`` on a connection of its own (opened as the server's pool opens
them, TLS included, but outside the pool: it never takes a request's slot; closed after it), and passes when a response head with an expected status
arrives within ``timeout``. A server that fails ``fall`` probes in a row is out of rotation
until it passes ``rise`` in a row; it starts in rotation. The probers of an upstream's servers
are spread over the interval, and each interval is drawn with some jitter, so that probes
(from several workers too) do not arrive in bursts. How this combines with passive health is
decided in one place, :meth:`pooled_proxy.upstream.balancer.UpstreamGroup.in_rotation`.

``ProbeState`` is the pure rise/fall bookkeeping; ``run_prober`` the trio shell.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

import trio

from ..config import HealthCheckConfig, ServerAddress
from ..errors import UpstreamError
from .api import ServerPool

LOG = logging.getLogger("pooled_proxy.health")

# What a probe can come to: "pass", or why it failed.
PROBE_RESULTS = ("pass", "status", "timeout", "connect_error", "error")
JITTER = 0.1  # each interval is drawn within +-10% of the configured one
USER_AGENT = b"pooled-proxy-health-check"


class ProbeState:
    """One server's active health: up or down, and the run of results against that state."""

    __slots__ = ("changes", "config", "results", "streak", "up")

    def __init__(self, config: HealthCheckConfig) -> None:
        self.config = config
        self.up = True
        self.streak = 0  # probes in a row that disagree with ``up``
        self.results: Counter[str] = Counter()  # by PROBE_RESULTS
        self.changes: Counter[str] = Counter()  # "up", "down": state changes

    def record(self, result: str) -> bool:
        """Count one probe's result; True if it changed the server's state."""
        self.results[result] += 1
        passed = result == "pass"
        if passed == self.up:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak < (self.config.rise if passed else self.config.fall):
            return False
        self.up, self.streak = passed, 0
        self.changes["up" if passed else "down"] += 1
        return True


async def probe(pool: ServerPool, config: HealthCheckConfig) -> str:
    """Run one probe of ``pool``'s server; its result, one of PROBE_RESULTS."""
    server: ServerAddress = pool.server
    with trio.move_on_after(config.timeout):
        try:
            connection = await pool.open_unpooled()
        except UpstreamError:
            return "connect_error"
        try:
            headers = [
                (b"host", (pool.config.host_header or str(server)).encode()),
                (b"user-agent", USER_AGENT),
                (b"connection", b"close"),
            ]
            await connection.send_request(b"GET", config.path.encode(), headers, end=True)
            head = await connection.receive_response_head()
            while head.informational:
                head = await connection.receive_response_head()
        except UpstreamError:
            return "error"
        finally:
            connection.close()
        return "pass" if config.expects(head.status_code) else "status"
    return "timeout"


async def run_prober(upstream: str, pool: ServerPool, state: ProbeState, *, offset: float) -> None:
    """Probe ``pool``'s server every interval (the first after ``offset``) until cancelled."""
    config, server = state.config, pool.server
    next_at = trio.current_time() + offset
    while True:
        await trio.sleep_until(next_at)
        result = await probe(pool, config)
        if state.record(result):
            if state.up:
                LOG.info("upstream %s: server %s passed %d health check(s) in a row: "
                         "back in rotation", upstream, server, config.rise)  # fmt: skip
            else:
                LOG.warning("upstream %s: server %s failed %d health check(s) in a row (last: "
                            "%s): out of rotation", upstream, server, config.fall, result)  # fmt: skip
        interval = config.interval * random.uniform(1 - JITTER, 1 + JITTER)
        next_at = max(next_at + interval, trio.current_time())


def first_probe_offset(index: int, count: int, interval: float) -> float:
    """When server ``index`` of ``count`` is first probed: spread evenly over one interval,
    with jitter within its share, so that the servers' probes do not line up."""
    share = interval / count
    return share * (index + random.random())
