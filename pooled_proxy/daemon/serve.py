"""One serving process: the proxy with its access log, metrics, admin listener and inspector,
reloads and systemd notification. The command line runs it for one process, and each worker
process runs it under the supervisor (workers.py)."""

from __future__ import annotations

import json
import logging
import socket
import sys
from collections.abc import Callable
from functools import partial

from ..config import Config
from ..exchange import ExchangeObserver
from ..ops.accesslog import AccessLog
from ..ops.admin import AdminServer
from ..ops.metrics import ProxyMetrics
from ..ops.status import StatusBoard
from ..proxy import Proxy
from ..tls_contexts import TlsContexts
from .lifecycle import Service
from .lifecycle import run as run_proxy
from .sdnotify import Notifier
from .workers import answer_supervisor


def configure_logging(level: str, *, tag: str = "") -> None:
    """Log to stderr; ``tag`` (e.g. ``[worker 1 pid 4242]``) names the process that logs."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


async def run_with_operations(
    config: Config,
    *,
    config_path: str | None = None,
    watch: bool = False,
    launch_config: Config | None = None,
    supervisor_link: socket.socket | None = None,
    tls: TlsContexts | None = None,
) -> None:
    """The proxy with its access log, and metrics plus the admin listener if ``[admin]`` is set;
    SIGHUP (and with ``watch`` any change of the file) reloads ``config_path``, SIGUSR1 reopens
    the access log file; systemd hears of it all if ``$NOTIFY_SOCKET`` is set. A worker gets
    ``supervisor_link``: it keeps metrics and answers the supervisor's requests for them.
    ``tls``: the config's SSL contexts, if the caller built them already."""
    access_log = AccessLog.from_config(config.log)
    keep_metrics = config.admin is not None or supervisor_link is not None
    metrics = ProxyMetrics() if keep_metrics else None
    observers: list[ExchangeObserver] = []
    if metrics is not None:
        observers.append(metrics.observe)
    if access_log is not None:
        observers.append(access_log)
    inspector = None
    if config.inspect.enabled and config.admin is not None:
        from ..ops.inspector.recorder import Inspector

        inspector = Inspector(config.inspect)
    proxy = Proxy(
        config, observers=tuple(observers), tap=inspector, launch_config=launch_config, tls=tls
    )
    services: list[Service] = []
    if metrics is not None:
        metrics.bind(proxy)
    board = StatusBoard(proxy, metrics) if metrics is not None else None
    if board is not None:
        services.append(board.run_sampler)
    if metrics is not None and config.admin is not None:
        routes = None
        if inspector is not None:
            from ..ops.inspector.endpoints import InspectorEndpoints
            from ..ops.inspector.replay import Replayer

            replayer = Replayer(proxy, inspector)
            services.append(replayer.run)
            routes = InspectorEndpoints(inspector, replayer)
        admin = AdminServer(proxy, metrics, config.admin.listen, status=board, routes=routes)
        services.append(admin.serve)
    if metrics is not None and board is not None and supervisor_link is not None:
        from ..ops.metrics_group import report

        def out_of_rotation() -> bytes:
            # Every upstream with no server in rotation here; the supervisor decides.
            return json.dumps(proxy.upstreams_out_of_rotation()).encode()

        reports: dict[str, Callable[[], bytes]] = {
            "metrics": partial(report, metrics.registry),
            "status": board.report,
            "upstreams_out_of_rotation": out_of_rotation,
        }
        services.append(partial(answer_supervisor, supervisor_link, reports))
    try:
        await run_proxy(
            proxy,
            services=services,
            config_path=config_path,
            watch=watch,
            reopen_logs=access_log.reopen if access_log is not None else None,
            notifier=Notifier.from_environment(),
        )
    finally:
        if access_log is not None:
            access_log.close()
