"""An upstream: its servers, one pool each, the balancing policy, passive and active health."""

from __future__ import annotations

import itertools
import ssl
from collections import deque
from collections.abc import Collection
from functools import partial

import trio

from ..config import UpstreamConfig
from ..errors import ProxyError, UpstreamUnavailable
from ..tls_contexts import upstream_ssl_context
from .api import ServerPool
from .health import ProbeState, first_probe_offset, run_prober
from .pool import Connector, UpstreamPool
from .pool_h2 import H2Pool


class ServerHealth:
    """Passive health: ``max_fails`` failures within ``fail_window`` mark a server down for
    ``fail_timeout``. Only consulted when the upstream has more than one server."""

    __slots__ = ("_config", "_failures", "down_until", "last_failure")

    def __init__(self, config: UpstreamConfig) -> None:
        self._config = config
        self._failures: deque[float] = deque()
        self.down_until = 0.0
        # (when, Proxy-Status error, detail) of the latest failure: the admin's "why".
        self.last_failure: tuple[float, str, str] | None = None

    def record_failure(self, now: float, error: ProxyError) -> bool:
        """Count a failure; True if it just marked the server down."""
        self.last_failure = (now, error.proxy_status, error.detail)
        window_start = now - self._config.fail_window
        failures = self._failures
        failures.append(now)
        while failures and failures[0] < window_start:
            failures.popleft()
        if self._config.max_fails and len(failures) >= self._config.max_fails:
            failures.clear()
            self.down_until = now + self._config.fail_timeout
            return True
        return False

    def record_success(self) -> None:
        self._failures.clear()

    def is_up(self, now: float) -> bool:
        return now >= self.down_until

    def recent_failures(self, now: float) -> int:
        """Failures within ``fail_window`` that have not (yet) marked the server down."""
        window_start = now - self._config.fail_window
        return sum(1 for failed_at in self._failures if failed_at >= window_start)


class UpstreamGroup:
    def __init__(
        self,
        config: UpstreamConfig,
        *,
        connect: Connector | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context``: for its https:// servers (built here if it has some and none is
        given). ``connect`` opens its HTTP/1.1 servers' connections (tests fake it)."""
        self.name = config.name
        self.config = config
        self.host_header = config.host_header.encode() if config.host_header else None
        if ssl_context is None and config.tls:
            ssl_context = upstream_ssl_context(config)
        self.pools: list[ServerPool] = [
            H2Pool(server, config, ssl_context=ssl_context)
            if server.h2
            else UpstreamPool(server, config, connect=connect, ssl_context=ssl_context)
            for server in config.servers
        ]
        self.health = [ServerHealth(config) for _ in self.pools]
        check = config.health_check
        # Active health, per server (None without health_check).
        self.probes = [ProbeState(check) if check else None for _ in self.pools]
        self._probes_on = check is not None
        self._next = itertools.cycle(range(len(self.pools)))
        self.server_tries = config.server_tries

    def in_rotation(self, index: int, now: float) -> bool:
        """Whether server ``index`` takes requests: the one rule that combines the checks.

        Active health (``health_check``) takes a server out after ``fall`` failed probes
        until it passes ``rise``; passive health takes it out for ``fail_timeout`` after
        ``max_fails`` failed requests, and only when the upstream has other servers. Either
        one is enough to take it out.
        """
        probe = self.probes[index]
        if probe is not None and not probe.up:
            return False
        return len(self.pools) == 1 or self.health[index].is_up(now)

    def has_server_in_rotation(self, now: float) -> bool:
        return any(self.in_rotation(i, now) for i in range(len(self.pools)))

    def choose(self, *, exclude: Collection[ServerPool] = ()) -> tuple[ServerPool, ServerHealth]:
        """The pool for the next exchange, skipping servers out of rotation (and ``exclude``:
        those the exchange already tried)."""
        pools = self.pools
        if len(pools) == 1 and not self._probes_on:
            return pools[0], self.health[0]
        now = trio.current_time()
        candidates = [
            i for i in range(len(pools)) if self.in_rotation(i, now) and pools[i] not in exclude
        ]
        if not candidates:
            raise UpstreamUnavailable(f"every server of upstream {self.name!r} is out of rotation")
        if self.config.balance == "least_conn":
            index = min(candidates, key=lambda i: pools[i].load)
        else:
            for index in self._next:
                if index in candidates:
                    break
        return pools[index], self.health[index]

    def use_tls(self, ssl_context: ssl.SSLContext | None) -> None:
        """New connections use ``ssl_context`` (a reload read the TLS files again); pooled
        ones stay as they are."""
        for pool in self.pools:
            pool.ssl_context = ssl_context

    async def run_reapers(self) -> None:
        async with trio.open_nursery() as nursery:
            for pool in self.pools:
                nursery.start_soon(pool.run_reaper)

    async def run_probers(self) -> None:
        """Probe every server (with ``health_check``) until cancelled."""
        check = self.config.health_check
        if check is None:
            return
        async with trio.open_nursery() as nursery:
            for i, (pool, state) in enumerate(zip(self.pools, self.probes)):
                assert state is not None
                offset = first_probe_offset(i, len(self.pools), check.interval)
                nursery.start_soon(partial(run_prober, self.name, pool, state, offset=offset))

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
