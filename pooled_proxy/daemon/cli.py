"""The ``pooled-proxy`` command: run, check, dev, demo, healthcheck.

Exit codes: 0 clean (a completed drain included), 2 bad config or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from functools import partial

import trio

from .. import __version__
from .._compiled import describe as describe_build
from ..config import Config, dev_config, load_config, parse_address
from ..errors import ConfigError
from ..ops.healthcheck import check as check_health
from ..route_hooks import load_route_hooks
from ..tls_contexts import TlsContexts, load_tls_contexts
from .runtime import tune_gc_for_serving
from .serve import configure_logging, run_with_operations
from .workers import supervise

LOG = logging.getLogger("pooled_proxy")

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


_CONFIG_HELP = "config file (default: $POOLED_PROXY_CONFIG)"


def _subcommand(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _config_arguments(command: argparse.ArgumentParser) -> None:
    """``-c FILE``, or ``FILE`` alone, or ``$POOLED_PROXY_CONFIG``."""
    command.add_argument("file", nargs="?", metavar="FILE", help="config file (same as -c FILE)")
    command.add_argument("-c", "--config", help=_CONFIG_HELP)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pooled-proxy",
        description="A reverse proxy with bounded keep-alive upstream pools, HTTP/1.1 and HTTP/2.",
    )
    parser.add_argument(
        "--version", action="version", version=f"pooled-proxy {__version__} ({describe_build()})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _subcommand(
        commands, "run", "run the proxy from a TOML config file",
        "Run the proxy from a TOML config file, checked as `check` does before anything\n"
        "listens. SIGTERM/SIGINT drain (a second one stops at once), SIGHUP reloads the\n"
        "file, SIGUSR1 reopens the access log file.",
        "  pooled-proxy run -c /etc/pooled-proxy/pooled-proxy.toml\n"
        "  pooled-proxy run --watch config/dev.toml     # reload on every save",
    )  # fmt: skip
    _config_arguments(run)
    run.add_argument(
        "--watch",
        action="store_true",
        help="reload the config whenever the file changes (as SIGHUP does)",
    )

    check = _subcommand(
        commands, "check", "validate a config file and exit",
        "Validate a config file without listening: every problem at once, as FILE:LINE:\n"
        "key: message (exit 2), or a one-line summary (exit 0). `run` refuses the same\n"
        "problems before it listens.",
        "  pooled-proxy check config/production.toml\n"
        "  pooled-proxy check -c /etc/pooled-proxy/pooled-proxy.toml",
    )  # fmt: skip
    _config_arguments(check)

    dev = _subcommand(
        commands, "dev", "a local dev proxy in front of your app, no config file",
        "A local proxy in front of the app(s) you develop, with config/dev.toml's settings:\n"
        "loopback only, combined access log, no read timeout (debuggers, SSE), and a 2s\n"
        "drain so that Ctrl-C does not keep you waiting. UPSTREAM is a URL, host:port, or a\n"
        "local port (:3000 or 3000, meaning localhost:3000). The request inspector shows\n"
        "the last 200 exchanges on the admin listener: http://127.0.0.1:9901/inspect.",
        "  pooled-proxy dev 3000\n"
        "  pooled-proxy dev :3000 --listen 8000\n"
        "  pooled-proxy dev 3000 --route /api=http://127.0.0.1:3001   # two apps\n"
        "  pooled-proxy dev https://staging.example.com --change-host-header\n"
        "  pooled-proxy dev 3000 --access-log /tmp/access.log\n"
        "  pooled-proxy dev 3000 --admin 4040    # the inspector on http://127.0.0.1:4040/inspect",
    )  # fmt: skip
    dev.add_argument("url", nargs="?", metavar="UPSTREAM", help="the app for every path")
    dev.add_argument("--to", metavar="UPSTREAM", help="the same as UPSTREAM (Caddy's spelling)")
    dev.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="ADDRESS",
        help="host:port, or a port alone for 127.0.0.1 (default: 127.0.0.1:8080)",
    )
    dev.add_argument(
        "--route",
        action="append",
        default=[],
        metavar="PREFIX=UPSTREAM",
        help="send paths under PREFIX (kept in the path) to another upstream; repeatable",
    )
    dev.add_argument(
        "--change-host-header",
        action="store_true",
        help="send the upstream's own host:port as Host, not the client's (remote apps)",
    )
    dev.add_argument(
        "--access-log",
        default="stdout",
        metavar="FILE",
        help='where the access log goes: a file, "stdout" (default) or "off"',
    )
    dev.add_argument(
        "--admin",
        default="127.0.0.1:9901",
        metavar="ADDRESS",
        help="the admin listener, with the request inspector at /inspect "
        "(default: 127.0.0.1:9901; a port alone for 127.0.0.1)",
    )
    dev.add_argument(
        "--no-inspect",
        action="store_true",
        help="do not record exchanges for the inspector",
    )

    demo = _subcommand(
        commands, "demo", "the proxy in front of the built-in demo upstream",
        "The proxy in front of a built-in demo upstream (a page with a live SSE stream,\n"
        "/echo, /events, /slow), to see it work without an app of your own.",
        "  pooled-proxy demo\n"
        "  pooled-proxy demo --listen 127.0.0.1:9000",
    )  # fmt: skip
    demo.add_argument("--listen", default="127.0.0.1:8080", help="address to listen on")

    health = _subcommand(
        commands, "healthcheck", "probe the running proxy its config describes (exit 0/1)",
        "Probe the proxy that a config file describes, from the same host or container:\n"
        "GET /readyz on its [admin] listener, or without [admin] a TCP connect to its first\n"
        "listen address. Prints one line and exits 0 (healthy) or 1 (anything else, a bad\n"
        "config included), as a Docker HEALTHCHECK expects.",
        "  pooled-proxy healthcheck -c /etc/pooled-proxy/pooled-proxy.toml\n"
        "  POOLED_PROXY_CONFIG=/etc/pooled-proxy/pooled-proxy.toml pooled-proxy healthcheck",
    )  # fmt: skip
    _config_arguments(health)
    # Longer than the supervisor's wait for a busy worker's report (workers.REPORT_TIMEOUT),
    # shorter than the Dockerfile's HEALTHCHECK --timeout of 3 s.
    health.add_argument(
        "--timeout", type=float, default=2.5, metavar="SECONDS", help="default: 2.5"
    )
    return parser


def _config_path(args: argparse.Namespace) -> str:
    """The config file named by FILE, ``-c FILE`` or ``$POOLED_PROXY_CONFIG``."""
    if args.file and args.config and args.file != args.config:
        raise SystemExit(f"pooled-proxy: two config files: {args.file} and -c {args.config}")
    path: str | None = args.file or args.config or os.environ.get("POOLED_PROXY_CONFIG")
    if not path:
        raise SystemExit("pooled-proxy: no config file: pass -c FILE or set $POOLED_PROXY_CONFIG")
    return path


def _load(path: str) -> tuple[Config, TlsContexts]:
    """Everything that can be checked without binding: ``check`` and ``run`` both call this.
    A TLS file that does not load is a config error, before listening; the contexts built
    to find out are the ones the proxy then uses."""
    config = load_config(path)
    tls = load_tls_contexts(config)
    load_route_hooks(config)  # so is a hook that does not import (the proxy reuses its modules)
    return config, tls


def describe(config: Config, mode: str, path: str | None) -> list[str]:
    """What this process is about to do, line by line, for the log at start."""
    source = f"config {os.path.abspath(path)}" if path else "no config file"
    build = describe_build()
    lines = [f"pooled-proxy {__version__} ({mode}, pid {os.getpid()}, {build}): {source}"]
    server = config.server
    listeners = [f"http://{address}" for address in server.listen]
    if server.tls is not None:
        listeners += [f"https://{address}" for address in server.tls.listen]
    workers = f", {server.workers} workers" if server.workers > 1 else ""
    lines.append(f"listen: {', '.join(listeners)}{workers}")
    for route in config.routes:
        upstream = config.upstreams[route.upstream]
        servers = ", ".join(
            f"{'https' if server.tls else 'http'}://{server}" for server in upstream.servers
        )
        extra = " (prefix stripped)" if route.strip_prefix and route.path_prefix != "/" else ""
        host = f" Host: {upstream.host_header}" if upstream.host_header else ""
        hooks = f" (hooks: {', '.join(route.hooks)})" if route.hooks else ""
        lines.append(
            f"route {route.host or '*'}{route.path_prefix}{extra}{hooks} -> upstream "
            f"{upstream.name}: {servers}{host}"
        )
    admin = config.admin
    lines.append(f"admin: http://{admin.listen}" if admin is not None else "admin: off")
    if admin is not None and config.inspect.enabled:
        lines.append(
            f"inspector: http://{admin.listen}/inspect (the last {config.inspect.keep} exchanges)"
        )
    log = config.log
    lines.append(f"access log: {log.access}" + ("" if log.access == "off" else f" ({log.format})"))
    return lines


def _log_start(config: Config, mode: str, path: str | None = None) -> None:
    for line in describe(config, mode, path):
        LOG.info("%s", line)


def _serve(
    config: Config,
    mode: str,
    path: str | None = None,
    *,
    watch: bool = False,
    tls: TlsContexts | None = None,
) -> int:
    configure_logging(config.log.level)
    _log_start(config, mode, path)
    if path is not None and config.server.workers > 1:
        return supervise(config, path, watch=watch)
    return _run_trio(partial(run_with_operations, config, config_path=path, watch=watch, tls=tls))


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


async def _demo(listen: str) -> None:
    from .demo_upstream import DemoUpstream

    async with trio.open_nursery() as nursery:
        upstream_port = await nursery.start(DemoUpstream().serve, "127.0.0.1", 0)
        config = dev_config(f"http://127.0.0.1:{upstream_port}", listen)
        config = replace(config, server=replace(config.server, drain_timeout=5.0))
        _log_start(config, "demo")
        LOG.info(
            "demo upstream on http://127.0.0.1:%d; try http://%s/ , /echo, /events, /slow",
            upstream_port,
            listen,
        )
        await run_with_operations(config)
        nursery.cancel_scope.cancel()


def dev_config_from_args(args: argparse.Namespace) -> Config:
    """The config ``pooled-proxy dev`` runs for its parsed arguments; ValueError if bad."""
    if args.url is not None and args.to is not None:
        raise ValueError("give the upstream once: as UPSTREAM or as --to")
    routes = []
    for value in args.route:
        prefix, equals, url = value.partition("=")
        if not equals or not url:
            raise ValueError(f'--route "{value}": expected PREFIX=UPSTREAM, e.g. /api=3001')
        routes.append((prefix, url))
    return dev_config(
        args.url if args.url is not None else args.to,
        args.listen,
        routes=routes,
        change_host_header=args.change_host_header,
        access=args.access_log,
        admin=args.admin,
        inspect=not args.no_inspect,
    )


def _dev(args: argparse.Namespace) -> int:
    return _serve(dev_config_from_args(args), "dev")


def _healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 or 1 only: Docker reserves 2, so a config error is unhealthy too."""
    try:
        config = load_config(_config_path(args))
    except ConfigError as exc:
        print(f"unhealthy: bad config: {exc.problems[0]}")
        return EXIT_RUNTIME
    except SystemExit as exc:
        print(f"unhealthy: {exc.code}")
        return EXIT_RUNTIME
    health = check_health(config, timeout=args.timeout)
    print(health.reason)
    return EXIT_OK if health.healthy else EXIT_RUNTIME


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "healthcheck":
        return _healthcheck(args)
    try:
        if args.command == "check":
            path = _config_path(args)
            config, _ = _load(path)
            print(
                f"{path}: ok ({len(config.upstreams)} upstream(s), {len(config.routes)} route(s))"
            )
            return EXIT_OK
        if args.command == "run":
            path = _config_path(args)
            config, tls = _load(path)
            return _serve(config, "run", path, watch=args.watch, tls=tls)
        if args.command == "dev":
            return _dev(args)
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
