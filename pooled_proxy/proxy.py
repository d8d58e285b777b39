"""The running proxy's shared state: the current config and forwarder, and the drain flag.

Front ends read ``proxy.forwarder`` per request, so a reload that swaps it takes effect for
new requests while exchanges in flight finish on the forwarder they started with.
"""

from __future__ import annotations

from collections import Counter

import trio

from .config import Config, ServerConfig
from .forward import ExchangeObserver, Forwarder
from .pool import Connector


class Proxy:
    def __init__(
        self,
        config: Config,
        *,
        connect: Connector | None = None,
        observers: tuple[ExchangeObserver, ...] = (),
    ) -> None:
        self.config = config
        self.forwarder = Forwarder(config, connect=connect, observers=observers)
        self.draining = False
        self.drain_started = trio.Event()
        # Cancel scopes of client connections waiting idle between requests: a drain
        # cancels them so idle keep-alive connections close at once.
        self.idle_waits: set[trio.CancelScope] = set()
        self.client_connections = 0
        # Open client connections by protocol ("http/1.1", "h2"): each front end counts its
        # own while it serves a connection; the metrics read it at scrape time.
        self.connections_by_protocol: Counter[str] = Counter()
        self.active_exchanges = 0

    @property
    def server(self) -> ServerConfig:
        return self.config.server

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.drain_started.set()
        for scope in list(self.idle_waits):
            scope.cancel()
