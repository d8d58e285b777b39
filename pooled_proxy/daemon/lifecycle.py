"""running -> draining -> stopped; signals; reload.

Signals: SIGTERM/SIGINT drain (a second one stops at once), SIGHUP reloads the config,
SIGUSR1 reopens the access log file (after logrotate moved it), SIGUSR2 is logged and
ignored: no signal the proxy does not use may kill it with its connections in flight.

Two nurseries, as hypercorn does it: the accept loops stop at once when a drain starts (the
listeners close, so new connections are refused), while client connections live in the
handler nursery, which gets ``drain_timeout`` to finish what is in flight before the rest is
cancelled. The pools and the admin server live in the root nursery, which outlives both.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial

import trio

from ..config import ServerAddress
from ..proxy import Proxy
from ..server.http2 import serve_h2
from ..server.listen import serve_listeners
from ..server.tls import serve_tls_listeners
from .reload import Reloader, watch_file
from .sdnotify import Notifier

LOG = logging.getLogger("pooled_proxy.lifecycle")

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
REOPEN_SIGNAL = signal.SIGUSR1
IGNORED_SIGNALS = (signal.SIGUSR2,)  # their default action would kill the process
HANDLED_SIGNALS = (*DRAIN_SIGNALS, RELOAD_SIGNAL, REOPEN_SIGNAL, *IGNORED_SIGNALS)

# A long-lived service (the admin server) started with ``nursery.start`` in the root nursery
# once the listeners are bound: it outlives the drain and stops when serving ends.
Service = Callable[..., Awaitable[object]]

# What accepts clients: ``listen(proxy, handler_nursery, task_status=...)`` reports the bound
# addresses, starts one handler task per connection in ``handler_nursery``, and returns once
# ``proxy.drain_started`` is set, its listeners closed. ``server.listen.serve_listeners`` in
# production; tests pass one over memory streams.
Listen = Callable[..., Awaitable[object]]


class Drain:
    """One drain, from its start to how it ended, for the log."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.started_at = proxy.drain_started_at or trio.current_time()
        self.grace = proxy.server.drain_timeout
        self.deadline = self.started_at + self.grace
        self.in_flight = proxy.active_exchanges
        self._started_before = proxy.exchanges_started
        self.cut: int | None = None  # exchanges still running at the deadline
        self.cut_connections = 0
        LOG.info(
            "drain started: %d exchange(s) in flight, %d client connection(s); "
            "waiting up to %gs (drain_timeout)",
            self.in_flight,
            proxy.client_connections,
            self.grace,
        )

    @property
    def waited_for(self) -> int:
        """In flight at the start, plus those that started during the drain (a request
        already on its way on a connection, an h2 stream opened before the GOAWAY arrived)."""
        return self.in_flight + self.proxy.exchanges_started - self._started_before

    async def cut_at_deadline(self, handlers: trio.CancelScope) -> None:
        await trio.sleep_until(self.deadline)
        self.cut = self.proxy.active_exchanges
        self.cut_connections = self.proxy.client_connections
        handlers.cancel()

    def log_end(self) -> None:
        elapsed = trio.current_time() - self.started_at
        waited = self.waited_for
        if not self.cut and not self.cut_connections:
            LOG.info(
                "drain complete after %.2fs: waited for %d exchange(s), all finished",
                elapsed,
                waited,
            )
            return
        cut = self.cut or 0
        LOG.warning(
            "drain deadline passed after %.2fs: waited for %d exchange(s), %d finished, "
            "%d cut; %d client connection(s) closed",
            elapsed,
            waited,
            waited - cut,
            cut,
            self.cut_connections,
        )


async def _listen_h1_h2(
    proxy: Proxy,
    handler_nursery: trio.Nursery,
    *,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    tls = proxy.server.tls
    if tls is None:
        await serve_listeners(proxy, handler_nursery, h2_handler=serve_h2, task_status=task_status)
        return
    async with trio.open_nursery() as listening:
        addresses = await listening.start(
            partial(serve_listeners, proxy, handler_nursery, h2_handler=serve_h2)
        )
        addresses += await listening.start(
            partial(serve_tls_listeners, proxy, handler_nursery, h2_handler=serve_h2)
        )
        task_status.started(addresses)


async def serve(
    proxy: Proxy,
    *,
    services: Sequence[Service] = (),
    listen: Listen = _listen_h1_h2,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``proxy.begin_drain()``, then drain and return; the pools are closed on
    the way out however it ends."""
    try:
        async with trio.open_nursery() as root:
            await root.start(proxy.run_pools)
            async with trio.open_nursery() as handlers:
                addresses = await handlers.start(listen, proxy, handlers)
                for address in addresses:
                    if address.tls:
                        LOG.info("listening on https://%s (HTTP/1.1, h2)", address)
                    else:
                        LOG.info("listening on http://%s (HTTP/1.1, h2c)", address)
                for service in services:
                    await root.start(service)
                task_status.started(addresses)
                await proxy.drain_started.wait()
                drain = Drain(proxy)
                root.start_soon(drain.cut_at_deadline, handlers.cancel_scope)
            drain.log_end()
            root.cancel_scope.cancel()
    finally:
        # Cancelled or drained, no pooled connection outlives the proxy.
        proxy.close_pools()


async def _watch_signals(
    proxy: Proxy,
    signals: AsyncIterator[int],
    stop: trio.CancelScope,
    nursery: trio.Nursery,
    reloader: Reloader | None,
    reopen_logs: Callable[[], object] | None,
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == RELOAD_SIGNAL:
            if reloader is None:
                LOG.warning("%s: no config file to reload (dev/demo mode)", name)
            elif proxy.draining:
                LOG.info("%s: draining, not reloading", name)
            else:
                nursery.start_soon(reloader.reload, name)
        elif signum == REOPEN_SIGNAL:
            if reopen_logs is None:
                LOG.info("%s: no log file to reopen", name)
            else:
                reopen_logs()
        elif signum in IGNORED_SIGNALS:
            LOG.info("%s: ignored (SIGHUP reloads, SIGUSR1 reopens the log files)", name)
        elif not proxy.draining:
            LOG.info("%s: draining", name)
            proxy.begin_drain()
        else:
            LOG.warning(
                "%s again: stopping now, cutting %d exchange(s)", name, proxy.active_exchanges
            )
            stop.cancel()


async def _serve_then_stop(
    proxy: Proxy,
    services: Sequence[Service],
    listen: Listen,
    stop: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(proxy, services=services, listen=listen, task_status=task_status)
    stop.cancel()


async def _notify_stopping(proxy: Proxy, notifier: Notifier) -> None:
    await proxy.drain_started.wait()
    notifier.stopping()


async def run(
    proxy: Proxy,
    *,
    services: Sequence[Service] = (),
    config_path: str | None = None,
    watch: bool = False,
    reopen_logs: Callable[[], object] | None = None,
    notifier: Notifier | None = None,
    listen: Listen = _listen_h1_h2,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve`` plus signals: the first SIGTERM/SIGINT drains, a second one stops at once;
    SIGHUP (and, with ``watch``, every change of the file) reloads ``config_path``; SIGUSR1
    calls ``reopen_logs``. ``notifier`` (systemd's ``NOTIFY_SOCKET``) hears READY=1 once
    every listener and service is up, RELOADING=1/READY=1 around reloads, STOPPING=1 when
    the drain starts."""
    notifier = notifier or Notifier(None)
    reloader = Reloader(proxy, config_path, notifier) if config_path is not None else None
    with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _watch_signals, proxy, signals, nursery.cancel_scope, nursery, reloader,
                reopen_logs,
            )  # fmt: skip
            if watch and reloader is not None:
                on_change = partial(reloader.reload, "file changed")
                await nursery.start(watch_file, reloader.path, on_change)
            addresses = await nursery.start(
                _serve_then_stop, proxy, services, listen, nursery.cancel_scope
            )
            status = ", ".join(f"{'https' if a.tls else 'http'}://{a}" for a in addresses)
            notifier.ready(f"serving on {status}")
            nursery.start_soon(_notify_stopping, proxy, notifier)
            task_status.started(addresses)
