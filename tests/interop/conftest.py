"""Fixtures that run real third-party servers as subprocesses on 127.0.0.1.

The long-lived ones (one per server program, shared by the whole session) are started on
first use; ``server_factory`` starts servers with test-specific settings. Every server is
killed in a ``finally``, with the process group it forked.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from pooled_proxy.config import ServerAddress, TlsConfig
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.proxy import Proxy
from tests.support.helpers import make_config

from .servers import (
    APPS,
    HOST,
    NOT_INSTALLED,
    ServerProcess,
    program_version,
    python_argv,
    require_program,
    start_server,
)

ServerFactory = Callable[..., ServerProcess]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per test skipped for a missing program, then what to install."""
    missing: dict[str, list[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
            program, found, _ = reason.partition(NOT_INSTALLED)
            if found:
                missing.setdefault(program, []).append(report.nodeid)
    if not missing:
        return
    skipped = sum(len(nodeids) for nodeids in missing.values())
    terminalreporter.write_sep("-", "interop tests skipped: programs not installed")
    for program, nodeids in missing.items():
        for nodeid in nodeids:
            terminalreporter.write_line(f"SKIPPED {nodeid}: {program}{NOT_INSTALLED}")
    terminalreporter.write_line(
        f"{skipped} interop test(s) skipped: {', '.join(missing)} not installed; "
        "`make interop-deps` installs them"
    )


def _package_version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


def uvicorn_argv(port: int, *extra: str) -> list[str]:
    return python_argv(
        "-m",
        "uvicorn",
        "tests.interop.apps.asgi_app:app",
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        *extra,
    )


def hypercorn_argv(port: int) -> list[str]:
    return python_argv(
        "-m",
        "hypercorn",
        "tests.interop.apps.asgi_app:app",
        "--bind",
        f"{HOST}:{port}",
    )


def aiohttp_argv(port: int) -> list[str]:
    return python_argv(str(APPS / "aiohttp_app.py"), str(port))


def gunicorn_argv(port: int) -> list[str]:
    return python_argv(
        "-m",
        "gunicorn",
        "--worker-class",
        "sync",
        "--workers",
        "2",
        "--bind",
        f"{HOST}:{port}",
        "--log-level",
        "warning",
        "tests.interop.apps.wsgi_app:app",
    )


def node_argv(port: int, keepalive_ms: int | None = None) -> list[str]:
    argv = [require_program("node"), str(APPS / "node_server.js"), str(port)]
    if keepalive_ms is not None:
        argv.append(str(keepalive_ms))
    return argv


NGINX_CONF = """
daemon off;
# One process: nginx's workers outlive a killed master, and a killed pytest would leave them.
master_process off;
pid {dir}/nginx.pid;
error_log stderr warn;
{user}
events {{ worker_connections 256; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # The second parameter makes nginx advertise "Keep-Alive: timeout=30".
    keepalive_timeout 30s 30s;
    keepalive_requests 1000;
    server {{
        listen {host}:{port};
        root {dir}/www;
        # Which upstream connection served a response, as nginx sees it.
        add_header X-Connection $connection always;
        add_header X-Connection-Requests $connection_requests always;
        location = /hello {{ default_type text/plain; return 200 "hello from nginx\\n"; }}
        location /dav/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 64m;
        }}
        # nginx closes a connection idle 2 s here, and says so: Keep-Alive: timeout=2.
        location /short-keepalive/ {{ keepalive_timeout 2s 2s; }}
        # nginx answers the 3rd request on a connection with Connection: close.
        location /few-requests/ {{ keepalive_requests 3; }}
    }}
}}
"""


def nginx_argv(port: int, directory: Path) -> list[str]:
    nginx = require_program("nginx")
    for sub in ("www/short-keepalive", "www/few-requests", "www/dav", "client_body"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    (directory / "www/short-keepalive/index.html").write_text("short keep-alive\n")
    (directory / "www/few-requests/index.html").write_text("few requests\n")
    (directory / "www/big.bin").write_bytes(bytes(range(256)) * 16384)  # 4 MiB, sendfile
    # Workers drop to "nobody" when the master is root; keep them able to write the DAV dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, host=HOST, port=port, user=user))
    return [nginx, "-p", str(directory), "-e", "stderr", "-c", str(conf)]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with test-specific settings; all are killed when the test ends."""
    started: list[ServerProcess] = []

    def start(
        name: str, argv_for_port: Callable[[int], Sequence[str]], **kwargs: object
    ) -> ServerProcess:
        server = start_server(name, argv_for_port, log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def _session_server(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    argv_for_port: Callable[[int], Sequence[str]],
    version: str,
) -> Iterator[ServerProcess]:
    server = start_server(name, argv_for_port, log_dir=tmp_path_factory.mktemp(name))
    server.version = version
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def uvicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """uvicorn serving the Starlette app (plain routes, sse-starlette, WebSocket)."""
    version = (
        f"uvicorn {_package_version('uvicorn')}, starlette {_package_version('starlette')}, "
        f"sse-starlette {_package_version('sse-starlette')}"
    )
    yield from _session_server(tmp_path_factory, "uvicorn", uvicorn_argv, version)


@pytest.fixture(scope="session")
def hypercorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    version = f"hypercorn {_package_version('hypercorn')}"
    yield from _session_server(tmp_path_factory, "hypercorn", hypercorn_argv, version)


@pytest.fixture(scope="session")
def aiohttp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    version = f"aiohttp {_package_version('aiohttp')}"
    yield from _session_server(tmp_path_factory, "aiohttp", aiohttp_argv, version)


@pytest.fixture(scope="session")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    version = f"gunicorn {_package_version('gunicorn')} (sync worker)"
    yield from _session_server(tmp_path_factory, "gunicorn", gunicorn_argv, version)


@pytest.fixture(scope="session")
def node_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Node's http server with its default keepAliveTimeout (5 s)."""
    version = f"node {program_version([require_program('node'), '--version'])}"
    yield from _session_server(tmp_path_factory, "node", node_argv, version)


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    directory = tmp_path_factory.mktemp("nginx-root")
    version = f"nginx {program_version([require_program('nginx'), '-v'])}"
    yield from _session_server(
        tmp_path_factory, "nginx", lambda port: nginx_argv(port, directory), version
    )


@dataclass(frozen=True)
class TlsSetup:
    """A trustme CA, its PEM file (for curl --cacert) and the proxy's [server.tls]."""

    ca: trustme.CA
    ca_file: Path
    config: TlsConfig

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def tls_setup(tmp_path_factory: pytest.TempPathFactory) -> TlsSetup:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(directory / "ca.pem")
    cert = ca.issue_cert(HOST, "localhost")
    for n, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(directory / "cert.pem", append=n > 0)
    cert.private_key_pem.write_to_path(directory / "key.pem")
    config = TlsConfig(
        listen=(ServerAddress(HOST, 0),), cert=directory / "cert.pem", key=directory / "key.pem"
    )
    return TlsSetup(ca, directory / "ca.pem", config)


@dataclass(frozen=True)
class TlsProxy:
    proxy: Proxy
    port: int  # cleartext
    tls_port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"https://{HOST}:{self.tls_port}"

    def pool(self):  # type: ignore[no-untyped-def]
        return self.proxy.forwarder.upstreams["app"].pools[0]


async def start_tls_proxy(
    nursery: trio.Nursery, upstream_port: int, tls: TlsSetup, **upstream: object
) -> TlsProxy:
    """The proxy with a cleartext and a TLS (ALPN h2, http/1.1) listener, both on port 0."""
    config = make_config(upstream_port, server={"tls": tls.config}, **upstream)
    proxy = Proxy(config)
    addresses = await nursery.start(serve, proxy)
    plain = [a.port for a in addresses if not a.tls]
    secure = [a.port for a in addresses if a.tls]
    assert len(plain) == 1 and len(secure) == 1, addresses
    return TlsProxy(proxy, plain[0], secure[0])
