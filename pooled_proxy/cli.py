"""The ``pooled-proxy`` command: run, check, dev, demo.

Exit codes: 0 clean (a completed drain included), 2 bad config or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial

import trio

from . import __version__
from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config, dev_config, load_config, parse_address
from .errors import ConfigError
from .forward import ExchangeObserver
from .lifecycle import Service
from .lifecycle import run as run_proxy
from .metrics import ProxyMetrics
from .proxy import Proxy
from .runtime import tune_gc_for_serving
from .tls_contexts import load_tls_contexts

LOG = logging.getLogger("pooled_proxy")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pooled-proxy",
        description="A reverse proxy with bounded keep-alive upstream pools, HTTP/1.1 and HTTP/2.",
    )
    parser.add_argument("--version", action="version", version=f"pooled-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy from a TOML config file")
    run.add_argument(
        "-c",
        "--config",
        default=os.environ.get("POOLED_PROXY_CONFIG"),
        help="config file (default: $POOLED_PROXY_CONFIG)",
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="reload the config whenever the file changes (as SIGHUP does)",
    )

    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument(
        "-c",
        "--config",
        default=os.environ.get("POOLED_PROXY_CONFIG"),
        help="config file (default: $POOLED_PROXY_CONFIG)",
    )

    dev = commands.add_parser("dev", help="proxy to one upstream URL with defaults, no config file")
    dev.add_argument("url", help="the upstream, e.g. http://127.0.0.1:3000")
    dev.add_argument("--listen", default="127.0.0.1:8080", help="address to listen on")

    demo = commands.add_parser("demo", help="the proxy in front of the built-in demo upstream")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="address to listen on")
    return parser


def configure_logging(level: str, *, tag: str = "") -> None:
    """Log to stderr; ``tag`` (e.g. ``[worker 1 pid 4242]``) names the process that logs."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str | None) -> Config:
    if not path:
        raise SystemExit("pooled-proxy: no config file: pass -c FILE or set $POOLED_PROXY_CONFIG")
    config = load_config(path)
    load_tls_contexts(config)  # a TLS file that does not load is a config error, before listening
    return config


def _serve(config: Config, path: str | None = None, *, watch: bool = False) -> int:
    configure_logging(config.log.level)
    if path is not None and config.server.workers > 1:
        from .workers import supervise

        return supervise(config, path, watch=watch)
    return _run_trio(partial(run_with_operations, config, config_path=path, watch=watch))


def _run_trio(async_fn: Callable[[], Awaitable[object]]) -> int:
    """Run the event loop; a runtime OSError (a port in use, say) is one log line and exit 1."""
    tune_gc_for_serving()
    try:
        trio.run(async_fn)
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        LOG.error("%s", exc)
        return EXIT_RUNTIME
    except BaseExceptionGroup as group:
        # Raised inside a nursery, the OSError arrives wrapped in exception groups.
        os_errors = group.subgroup(OSError)
        if os_errors is None:
            raise
        first: BaseException = os_errors
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        LOG.error("%s", first)
        return EXIT_RUNTIME
    return EXIT_OK


async def run_with_operations(
    config: Config,
    *,
    config_path: str | None = None,
    watch: bool = False,
    launch_config: Config | None = None,
    supervisor_link: socket.socket | None = None,
) -> None:
    """The proxy with its access log, and metrics plus the admin listener if ``[admin]`` is set;
    SIGHUP (and with ``watch`` any change of the file) reloads ``config_path``. A worker gets
    ``supervisor_link``: it keeps metrics and answers the supervisor's requests for them."""
    access_log = AccessLog.from_config(config.log)
    keep_metrics = config.admin is not None or supervisor_link is not None
    metrics = ProxyMetrics() if keep_metrics else None
    observers: list[ExchangeObserver] = []
    if metrics is not None:
        observers.append(metrics.observe)
    if access_log is not None:
        observers.append(access_log)
    proxy = Proxy(config, observers=tuple(observers), launch_config=launch_config)
    services: list[Service] = []
    if metrics is not None:
        metrics.bind(proxy)
    if metrics is not None and config.admin is not None:
        services.append(AdminServer(proxy, metrics, config.admin.listen).serve)
    if metrics is not None and supervisor_link is not None:
        from .metrics_group import report
        from .workers import answer_supervisor

        reports = {"metrics": partial(report, metrics.registry)}
        services.append(partial(answer_supervisor, supervisor_link, reports))
    try:
        await run_proxy(proxy, services=services, config_path=config_path, watch=watch)
    finally:
        if access_log is not None:
            access_log.close()


async def _demo(listen: str) -> None:
    from .demo import DemoUpstream

    async with trio.open_nursery() as nursery:
        upstream_port = await nursery.start(DemoUpstream().serve, "127.0.0.1", 0)
        config = dev_config(f"http://127.0.0.1:{upstream_port}", listen)
        config = replace(config, server=replace(config.server, drain_timeout=5.0))
        LOG.info(
            "demo upstream on http://127.0.0.1:%d; try http://%s/ , /echo, /events, /slow",
            upstream_port,
            listen,
        )
        await run_with_operations(config)
        nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            config = _load(args.config)
            print(
                f"{args.config}: ok ({len(config.upstreams)} upstream(s), {len(config.routes)} route(s))"
            )
            return EXIT_OK
        if args.command == "run":
            return _serve(_load(args.config), args.config, watch=args.watch)
        if args.command == "dev":
            return _serve(dev_config(args.url, args.listen))
        if args.command == "demo":
            parse_address(args.listen)
            configure_logging("info")
            return _run_trio(partial(_demo, args.listen))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        print(f"pooled-proxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return EXIT_USAGE
        raise
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
