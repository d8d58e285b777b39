"""running -> draining -> stopped.

Two nurseries, as hypercorn does it: the accept loops live in an inner nursery that a drain
cancels at once (new connections are refused), while client connections live in the handler
nursery, which gets ``drain_timeout`` to finish what is in flight before it is cancelled.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import trio

from .config import ServerAddress
from .proxy import Proxy
from .server.http2 import serve_h2
from .server.listen import serve_listeners

LOG = logging.getLogger("pooled_proxy.lifecycle")

DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# A long-lived service (the admin server) started with ``nursery.start`` in the root nursery
# once the listeners are bound: it outlives the drain and stops when serving ends.
Service = Callable[..., Awaitable[object]]


async def serve(
    proxy: Proxy,
    *,
    services: Sequence[Service] = (),
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``proxy.begin_drain()``, then drain and return."""
    try:
        async with trio.open_nursery() as root:
            root.start_soon(proxy.forwarder.run_reapers)
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as accept:
                    addresses = await accept.start(
                        partial(serve_listeners, proxy, handlers, h2_handler=serve_h2)
                    )
                    for address in addresses:
                        LOG.info("listening on http://%s (HTTP/1.1, h2c)", address)
                    for service in services:
                        await root.start(service)
                    task_status.started(addresses)
                    await proxy.drain_started.wait()
                    accept.cancel_scope.cancel()
                handlers.cancel_scope.deadline = trio.current_time() + proxy.server.drain_timeout
                LOG.info(
                    "drain started: %d exchange(s) in flight, %d client connection(s), grace %gs",
                    proxy.active_exchanges,
                    proxy.client_connections,
                    proxy.server.drain_timeout,
                )
            if handlers.cancel_scope.cancelled_caught:
                LOG.warning("drain deadline passed: in-flight exchanges were cut")
            else:
                LOG.info("drain complete: every exchange finished")
            root.cancel_scope.cancel()
    finally:
        # Cancelled or drained, no pooled connection outlives the proxy.
        proxy.forwarder.close()


async def run(
    proxy: Proxy,
    *,
    services: Sequence[Service] = (),
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve`` plus signals: the first SIGTERM/SIGINT drains, a second one stops at once."""
    with trio.open_signal_receiver(*DRAIN_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not proxy.draining:
                        LOG.info("%s: draining", name)
                        proxy.begin_drain()
                    else:
                        LOG.warning("%s again: stopping now", name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await serve(proxy, services=services, task_status=task_status)
            nursery.cancel_scope.cancel()
