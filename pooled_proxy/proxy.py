"""The running proxy's shared state: the current config and forwarder, and the drain flag.

Front ends read ``proxy.forwarder`` per request, so a reload that swaps it takes effect for
new requests while exchanges in flight finish on the forwarder they started with.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import trio

from .config import Config, ServerConfig, TlsConfig
from .exchange import ExchangeObserver, ExchangeRecord, ExchangeTap
from .forward import Forwarder
from .route_hooks import RouteHooks
from .tls_contexts import TlsContexts, load_tls_contexts, warn_unverified
from .upstream.balancer import UpstreamGroup
from .upstream.pool import Connector

# A client that connected just before the drain started is about to send its request: its
# bytes may already be on the way. It gets this long to start, then it counts as idle and is
# closed (a browser's speculative preconnect must not hold the drain for drain_timeout).
FIRST_REQUEST_GRACE = 1.0

# The client-connections gauge's protocol for a connection whose protocol is not known yet:
# its TLS handshake or its first bytes are awaited.
PENDING = "pending"

# A request still waiting in a pool's queue this long before the drain deadline is answered
# 503: it never reached an upstream, and its answer must get out before the cut.
DRAIN_ANSWER_TIME = 0.1

# Settings a reload cannot apply to a running process: the sockets, the worker processes, the
# admin listener and the access log are set up once at start. (The TLS certificate and key
# are not among them: a reload loads them again for new connections.)
RESTART_ONLY = (
    "server.listen",
    "server.tls.listen",
    "server.workers",
    "admin",
    "inspect",
    "log.access",
    "log.format",
)


def _restart_only(config: Config) -> tuple[object, ...]:
    server, log = config.server, config.log
    tls_listen = server.tls.listen if server.tls is not None else None
    return (
        server.listen, tls_listen, server.workers, config.admin, config.inspect, log.access,
        log.format,
    )  # fmt: skip


def _running_tls(running: TlsConfig | None, new: TlsConfig | None) -> TlsConfig | None:
    """``[server.tls]`` after a reload: the listeners stay, the certificate files are new."""
    if running is None or new is None:
        return running  # TLS turned on or off: needs a restart
    return replace(new, listen=running.listen)


@dataclass(frozen=True, slots=True)
class ReloadSummary:
    """What a reload changed, for the log line."""

    routes: int
    kept: tuple[str, ...] = ()  # upstreams whose pools (and idle connections) carry on
    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()  # settings changed: new pools, the old ones drain
    removed: tuple[str, ...] = ()  # their pools drain
    needs_restart: tuple[str, ...] = ()  # RESTART_ONLY keys that differ

    def __str__(self) -> str:
        parts = [f"{self.routes} route(s)"]
        for label, names in (
            ("kept", self.kept),
            ("added", self.added),
            ("replaced", self.replaced),
            ("removed", self.removed),
        ):
            if names:
                parts.append(f"upstreams {label}: {', '.join(names)}")
        return "; ".join(parts)


class Proxy:
    def __init__(
        self,
        config: Config,
        *,
        connect: Connector | None = None,
        observers: tuple[ExchangeObserver, ...] = (),
        tap: ExchangeTap | None = None,
        launch_config: Config | None = None,
        tls: TlsContexts | None = None,
        hooks: RouteHooks | None = None,
    ) -> None:
        self.config = config
        # The SSL contexts of the config (built here unless the caller already did).
        self.tls = tls if tls is not None else load_tls_contexts(config)
        warn_unverified(config)
        # The config as its file said at start (a worker's listen addresses are pinned to
        # the supervisor's ports): reloads compare restart-only settings against it.
        self.launch_config = launch_config or config
        self._connect = connect
        # Each finished exchange's record goes to these, in order (see observe()).
        self.observers = (*observers, tap.finished) if tap is not None else observers
        self._tap = tap
        self.forwarder = Forwarder(
            config,
            connect=connect,
            tap=tap,
            tls=self.tls.upstreams,
            hooks=hooks,
        )
        self.reloads = 0
        # For the metrics: whether the last reload attempt succeeded, and the wall-clock time
        # of the last config load that did (the start counts as one).
        self.last_reload_ok = True
        self.config_loaded_at = time.time()
        self.draining = False
        self.drain_started = trio.Event()
        self.drain_started_at: float | None = None
        # Cancel scopes of client connections waiting idle between requests: a drain
        # cancels them so idle keep-alive connections close at once.
        self.idle_waits: set[trio.CancelScope] = set()
        # Cancel scopes of new connections waiting for their first request bytes.
        self.first_request_waits: set[trio.CancelScope] = set()
        self.client_connections = 0
        # Open client connections by protocol ("http/1.1", "h2", PENDING): each front end
        # counts its own while it serves a connection, the listener those it has not handed
        # to one yet; the metrics read it at scrape time.
        self.connections_by_protocol: Counter[str] = Counter()
        self.active_exchanges = 0  # in flight: see exchange_started() / exchange_finished()
        self.exchanges_started = 0  # ever; the drain log counts the ones it waited for
        self._pool_nursery: trio.Nursery | None = None
        self._reapers: dict[UpstreamGroup, trio.CancelScope] = {}
        self._probers: dict[UpstreamGroup, trio.CancelScope] = {}  # active health checks

    @property
    def server(self) -> ServerConfig:
        return self.config.server

    # -- exchanges ---------------------------------------------------------------------------
    # Plain methods, not a context manager: they run for every request.

    def exchange_started(self) -> None:
        """A front end took a request on; it is in flight until ``exchange_finished``."""
        self.active_exchanges += 1
        self.exchanges_started += 1

    def exchange_finished(self, record: ExchangeRecord) -> None:
        """The exchange ``exchange_started`` counted is over, answered or not."""
        self.active_exchanges -= 1
        self.observe(record)

    def observe(self, record: ExchangeRecord) -> None:
        """``record`` is final: its duration, then the observers (metrics, access log,
        inspector). A front end calls it alone for an answer given before any exchange."""
        record.duration = trio.current_time() - record.start
        for observer in self.observers:
            observer(record)

    # -- drain -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking work: listeners close (``serve_listeners`` watches ``drain_started``),
        idle client connections close now, new ones get ``FIRST_REQUEST_GRACE``. Requests
        queued for an upstream connection stay queued, up to ``DRAIN_ANSWER_TIME`` before
        the drain deadline."""
        if self.draining:
            return
        self.draining = True
        self.drain_started_at = trio.current_time()
        self.drain_started.set()
        for scope in self._probers.values():  # nothing new goes upstream: no need to probe
            scope.cancel()
        self._probers.clear()
        for scope in list(self.idle_waits):
            scope.cancel()
        deadline = self.drain_started_at + FIRST_REQUEST_GRACE
        for scope in list(self.first_request_waits):
            scope.deadline = min(scope.deadline, deadline)
        grace = self.server.drain_timeout
        waits_end = self.drain_started_at + max(grace - DRAIN_ANSWER_TIME, grace / 2)
        for group in self.forwarder.upstreams.values():
            for pool in group.pools:
                pool.end_waits_by(waits_end)

    @contextmanager
    def waiting_for_first_request(self) -> Iterator[trio.CancelScope]:
        """Wrap a new connection's wait for its first bytes: while draining, it is cut after
        ``FIRST_REQUEST_GRACE`` (check ``cancelled_caught``)."""
        scope = trio.CancelScope()
        if self.drain_started_at is not None:
            scope.deadline = self.drain_started_at + FIRST_REQUEST_GRACE
        self.first_request_waits.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self.first_request_waits.discard(scope)

    async def unready_upstreams(self) -> list[str]:
        """For ``/readyz``: with ``[admin] ready_requires_healthy_upstreams``, the upstreams
        with no server in rotation."""
        await trio.lowlevel.checkpoint()
        return self.upstreams_out_of_rotation() if self.requires_healthy_upstreams else []

    @property
    def requires_healthy_upstreams(self) -> bool:
        admin = self.config.admin
        return admin is not None and admin.ready_requires_healthy_upstreams

    def upstreams_out_of_rotation(self) -> list[str]:
        now = trio.current_time()
        return [name for name, group in self.forwarder.upstreams.items()
                if not group.has_server_in_rotation(now)]  # fmt: skip

    # -- pools ---------------------------------------------------------------------------------

    async def run_pools(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the idle reaper of every pool and the health probers of every upstream that
        has them, including those a reload adds, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._pool_nursery = nursery
                for group in self.forwarder.upstreams.values():
                    self._start_upstream_tasks(group)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._pool_nursery = None
            self._reapers.clear()
            self._probers.clear()

    def _start_upstream_tasks(self, group: UpstreamGroup) -> None:
        """Start the group's reapers and, unless draining, its health probers."""
        if self._pool_nursery is None:
            return
        if group not in self._reapers:
            self._reapers[group] = self._start_in_scope(group.run_reapers)
        if group.config.health_check and not self.draining and group not in self._probers:
            self._probers[group] = self._start_in_scope(group.run_probers)

    def _start_in_scope(self, run: Callable[[], Awaitable[None]]) -> trio.CancelScope:
        assert self._pool_nursery is not None
        scope = trio.CancelScope()

        async def in_scope() -> None:
            with scope:
                await run()

        self._pool_nursery.start_soon(in_scope)
        return scope

    def _retire(self, group: UpstreamGroup) -> None:
        """A removed or replaced upstream: idle connections close now, busy ones when their
        exchange ends; its reaper stops (nothing idle is left to expire), its probers too."""
        group.close()
        for scopes in (self._reapers, self._probers):
            scope = scopes.pop(group, None)
            if scope is not None:
                scope.cancel()

    def close_pools(self) -> None:
        """At exit: no pooled connection outlives the proxy."""
        self.forwarder.close()

    # -- reload --------------------------------------------------------------------------------

    def reload(
        self, config: Config, tls: TlsContexts | None = None, hooks: RouteHooks | None = None
    ) -> ReloadSummary:
        """Swap in a new config (already validated) for new requests.

        Upstreams whose settings are unchanged keep their pools, idle connections included;
        changed or removed ones get new pools and their old ones drain. Exchanges in flight
        finish on the forwarder they started with. Restart-only settings keep their running
        values (reported in ``needs_restart``). The TLS files are read again (``tls``, built
        off the event loop by the caller, else here): new connections, to clients and to
        upstreams, use them; open ones keep the certificates they were made with. Likewise the
        routes' ``hooks``: new requests run the new ones.
        """
        if tls is None:
            tls = load_tls_contexts(config)
        warn_unverified(config)
        old = self.forwarder
        kept = {
            name: old.upstreams[name]
            for name, upstream in config.upstreams.items()
            if name in old.upstreams and old.upstreams[name].config == upstream
        }
        running = self.config
        effective = replace(
            config,
            server=replace(
                config.server,
                listen=running.server.listen,
                tls=_running_tls(running.server.tls, config.server.tls),
                workers=running.server.workers,
            ),
            admin=running.admin,
            inspect=running.inspect,
            log=replace(config.log, access=running.log.access, format=running.log.format),
        )
        for name, group in kept.items():
            group.use_tls(tls.upstreams.get(name))
        new = Forwarder(
            effective,
            connect=self._connect,
            tap=self._tap,
            upstreams=kept,
            tls=tls.upstreams,
            hooks=hooks,
        )
        # With TLS turned on or off, the listeners keep what they started with until a restart.
        same_listeners = effective.server.tls is not None and tls.server is not None
        self.tls = TlsContexts(tls.server if same_listeners else self.tls.server, tls.upstreams)
        new.stale_retries = old.stale_retries  # a counter: it carries on across generations
        new.warnings = old.warnings  # an outage across a reload is still one outage
        new.live = old.live  # shared: exchanges still on the old forwarder count there too
        self.config = effective
        self.forwarder = new
        self.reloads += 1
        self.last_reload_ok = True
        self.config_loaded_at = time.time()
        for group in old.upstreams.values():
            if new.upstreams.get(group.name) is not group:
                self._retire(group)
        for group in new.upstreams.values():
            self._start_upstream_tasks(group)
        differs = [
            key
            for key, before, after in zip(
                RESTART_ONLY, _restart_only(self.launch_config), _restart_only(config)
            )
            if before != after
        ]
        return ReloadSummary(
            routes=len(config.routes),
            kept=tuple(sorted(kept)),
            added=tuple(sorted(set(config.upstreams) - set(old.upstreams))),
            replaced=tuple(sorted(set(config.upstreams) & set(old.upstreams) - set(kept))),
            removed=tuple(sorted(set(old.upstreams) - set(config.upstreams))),
            needs_restart=tuple(differs),
        )
