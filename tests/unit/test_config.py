"""Config contract tests: TOML in, frozen dataclasses or exact ``FILE:LINE: key: message`` out."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import textwrap
from pathlib import Path

import pytest

import pooled_proxy.config as config_module
from pooled_proxy.config import (
    DEFAULT_LISTEN,
    AdminConfig,
    Config,
    HealthCheckConfig,
    LogConfig,
    RouteConfig,
    ServerAddress,
    ServerConfig,
    TlsConfig,
    UpstreamConfig,
    dev_config,
    dev_listen,
    dev_upstream,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)
from pooled_proxy.errors import ConfigError, ConfigProblem

DESIGN_EXAMPLE = """\
[server]
listen = ["127.0.0.1:8080"]     # cleartext: HTTP/1.1 and h2c
workers = 1                     # processes accepting from one shared socket
header_timeout = "10s"          # a client must send its whole request head within this
keepalive_timeout = "75s"       # idle client connection closed after this
max_header_bytes = 65536        # over it: 431
max_body_bytes = 0              # 0 = no limit; over it: 413
drain_timeout = "30s"

[server.tls]                    # optional: TLS listener with ALPN h2, http/1.1
listen = ["0.0.0.0:8443"]
cert = "cert.pem"
key = "key.pem"

[admin]                         # optional
listen = "127.0.0.1:9901"       # GET /metrics (Prometheus), /healthz, /readyz

[log]
access = "stdout"               # "stdout" | "off" | a file path
format = "json"                 # "json" | "combined"
level = "info"

[upstreams.api]
servers = ["127.0.0.1:9000"]    # one or more host:port (http:// or https:// prefix allowed)
balance = "round_robin"         # or "least_conn"
max_connections = 100           # per server, in use + idle
max_idle = 32                   # per server
idle_timeout = "60s"
connect_timeout = "3s"
response_header_timeout = "30s" # request sent -> response head received, else 504
read_timeout = "300s"           # longest silence inside a response body; "0s" = none
queue_size = 1024               # requests allowed to wait for a connection
queue_timeout = "5s"            # wait longer -> 503
max_requests_per_connection = 0 # 0 = unlimited

[[routes]]                      # first match wins
host = "api.localhost"          # optional; exact, or "*.example.com"
path_prefix = "/api/"           # optional; default "/"
upstream = "api"
strip_prefix = false
"""

MINIMAL = '[upstreams.api]\nservers = ["127.0.0.1:9000"]\n'


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path so messages name the file as ``proxy.toml``, as an operator would see."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("cert")
    (tmp_path / "key.pem").write_text("key")
    return tmp_path


def problems(text: str) -> list[str]:
    """Write ``proxy.toml``, load it, and return the printed problems (it must fail)."""
    Path("proxy.toml").write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as info:
        load_config("proxy.toml")
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def load(text: str) -> Config:
    Path("proxy.toml").write_text(textwrap.dedent(text))
    return load_config("proxy.toml")


# ------------------------------------------------------------------------------ valid configs


def test_design_example_loads_cleanly(in_tmp: Path) -> None:
    config = load(DESIGN_EXAMPLE)
    assert config.server.listen == (ServerAddress("127.0.0.1", 8080),)
    assert config.server.tls == TlsConfig(
        listen=(ServerAddress("0.0.0.0", 8443),), cert=in_tmp / "cert.pem", key=in_tmp / "key.pem"
    )
    assert config.admin == AdminConfig(listen=ServerAddress("127.0.0.1", 9901))
    assert config.log == LogConfig()
    assert config.upstreams["api"] == UpstreamConfig(
        name="api", servers=(ServerAddress("127.0.0.1", 9000),)
    )
    assert config.routes == (
        RouteConfig(upstream="api", host="api.localhost", path_prefix="/api/"),
    )
    assert config.path == Path("proxy.toml")


def test_full_config_round_trips(in_tmp: Path) -> None:
    Path("logs").mkdir()
    config = load(
        """\
        [server]
        listen = ["0.0.0.0:80", "[::]:8080"]
        workers = 4
        header_timeout = "2.5s"
        keepalive_timeout = "1m"
        body_timeout = "30s"
        write_timeout = "45s"
        max_header_bytes = 16384
        max_header_count = 50
        max_body_bytes = 1048576
        max_connections = 500
        max_requests_per_connection = 1000
        max_concurrent_streams = 64
        drain_timeout = "0s"

        [server.tls]
        listen = ["0.0.0.0:443"]
        cert = "cert.pem"
        key = "key.pem"

        [admin]
        listen = "127.0.0.1:9901"

        [log]
        access = "logs/access.log"
        format = "combined"
        level = "debug"

        [upstreams.api]
        servers = ["http://10.0.0.1", "https://api.internal", "10.0.0.2:8000"]
        balance = "least_conn"
        max_connections = 10
        max_idle = 20
        idle_timeout = "90s"
        connect_timeout = "250ms"
        response_header_timeout = "1h"
        read_timeout = "0s"
        queue_size = 0
        queue_timeout = "100ms"
        max_requests_per_connection = 7
        max_fails = 5
        fail_window = "20s"
        fail_timeout = "2m"
        next_server_tries = 2

        [upstreams.web]
        servers = ["127.0.0.1:3000"]

        [[routes]]
        host = "API.Example.com"
        path_prefix = "/v1/"
        upstream = "api"
        strip_prefix = true

        [[routes]]
        host = "*.example.com"
        upstream = "web"

        [[routes]]
        upstream = "web"
        """
    )
    assert config == Config(
        server=ServerConfig(
            listen=(ServerAddress("0.0.0.0", 80), ServerAddress("::", 8080)),
            workers=4,
            header_timeout=2.5,
            keepalive_timeout=60.0,
            body_timeout=30.0,
            write_timeout=45.0,
            max_header_bytes=16384,
            max_header_count=50,
            max_body_bytes=1048576,
            max_connections=500,
            max_requests_per_connection=1000,
            max_concurrent_streams=64,
            drain_timeout=0.0,
            tls=TlsConfig(
                listen=(ServerAddress("0.0.0.0", 443),),
                cert=in_tmp / "cert.pem",
                key=in_tmp / "key.pem",
            ),
        ),
        admin=AdminConfig(listen=ServerAddress("127.0.0.1", 9901)),
        log=LogConfig(access=str(in_tmp / "logs" / "access.log"), format="combined", level="debug"),
        upstreams={
            "api": UpstreamConfig(
                name="api",
                servers=(
                    ServerAddress("10.0.0.1", 80),
                    ServerAddress("api.internal", 443, tls=True),
                    ServerAddress("10.0.0.2", 8000),
                ),
                balance="least_conn",
                max_connections=10,
                max_idle=20,
                idle_timeout=90.0,
                connect_timeout=0.25,
                response_header_timeout=3600.0,
                read_timeout=0.0,
                queue_size=0,
                queue_timeout=0.1,
                max_requests_per_connection=7,
                max_fails=5,
                fail_window=20.0,
                fail_timeout=120.0,
                next_server_tries=2,
            ),
            "web": UpstreamConfig(name="web", servers=(ServerAddress("127.0.0.1", 3000),)),
        },
        routes=(
            RouteConfig(
                upstream="api", host="api.example.com", path_prefix="/v1/", strip_prefix=True
            ),
            RouteConfig(upstream="web", host="*.example.com"),
            RouteConfig(upstream="web"),
        ),
        path=Path("proxy.toml"),
    )


def test_minimal_config_gets_defaults_and_an_implicit_route(in_tmp: Path) -> None:
    config = load(MINIMAL)
    assert config.server == ServerConfig()
    assert [str(a) for a in config.server.listen] == list(DEFAULT_LISTEN)
    assert config.admin is None and config.log == LogConfig()
    assert config.routes == (RouteConfig(upstream="api"),)


def test_request_id_keys(in_tmp: Path) -> None:
    config = load(MINIMAL + "[server]\nrequest_id = false\nrequest_id_header = 'X-Trace-ID'\n")
    assert (config.server.request_id, config.server.request_id_header) == (False, "x-trace-id")
    assert (ServerConfig().request_id, ServerConfig().request_id_header) == (True, "x-request-id")


def test_health_check_keys(in_tmp: Path) -> None:
    config = load(
        MINIMAL
        + 'health_check = { path = "/up?deep=1", interval = "10s", timeout = "2s", '
        + 'expect_status = "200-299, 304", rise = 1, fall = 5 }\n'
        + "[upstreams.web]\nservers = ['127.0.0.1:9001']\n[upstreams.web.health_check]\n"
        + "expect_status = 204\n"
        + "[admin]\nlisten = '127.0.0.1:9901'\nready_requires_healthy_upstreams = true\n"
        + "[[routes]]\nupstream = 'api'\n"
    )
    check = config.upstreams["api"].health_check
    assert check == HealthCheckConfig(
        path="/up?deep=1",
        interval=10.0,
        timeout=2.0,
        expect_status=((200, 299), (304, 304)),
        rise=1,
        fall=5,
    )
    assert [check.expects(s) for s in (199, 200, 299, 300, 304)] == [False, True, True, False, True]
    assert config.upstreams["web"].health_check == HealthCheckConfig(expect_status=((204, 204),))
    assert config.admin is not None and config.admin.ready_requires_healthy_upstreams
    assert load(MINIMAL).upstreams["api"].health_check is None


def test_config_is_frozen(in_tmp: Path) -> None:
    config = load(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.upstreams["other"] = config.upstreams["api"]  # type: ignore[index]


def test_listen_empty_is_allowed_with_tls(in_tmp: Path) -> None:
    config = load(
        MINIMAL + '[server]\nlisten = []\n[server.tls]\nlisten = ["0.0.0.0:8443"]\n'
        'cert = "cert.pem"\nkey = "key.pem"\n'
    )
    assert config.server.listen == ()
    assert config.server.tls is not None


def test_relative_paths_resolve_against_the_config_folder(in_tmp: Path) -> None:
    sub = in_tmp / "etc"
    sub.mkdir()
    (sub / "c.pem").write_text("x")
    (sub / "proxy.toml").write_text(
        MINIMAL + '[server.tls]\nlisten = ["0.0.0.0:8443"]\ncert = "c.pem"\nkey = "../key.pem"\n'
        '[log]\naccess = "access.log"\n'
    )
    config = load_config(sub / "proxy.toml")
    assert config.server.tls is not None
    assert config.server.tls.cert == sub / "c.pem"
    assert config.server.tls.key == in_tmp / "key.pem"
    assert config.log.access == str(sub / "access.log")
    assert config.path == sub / "proxy.toml"


@pytest.mark.parametrize(
    ("server", "admin"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("*:8080", "[::1]:8080"),
        ("[::]:8080", "[::1]:8080"),
    ],
)
def test_admin_and_server_on_one_address_is_a_problem(
    in_tmp: Path, server: str, admin: str
) -> None:
    assert problems(f'{MINIMAL}[server]\nlisten = ["{server}"]\n[admin]\nlisten = "{admin}"\n') == [
        f'proxy.toml:6: admin.listen: "{admin}" is already taken by server.listen[0] ("{server}")'
    ]


def test_tls_and_admin_on_one_address_is_a_problem(in_tmp: Path) -> None:
    assert problems(
        MINIMAL + '[server.tls]\nlisten = ["127.0.0.1:9901"]\ncert = "cert.pem"\nkey = "key.pem"\n'
        '[admin]\nlisten = "0.0.0.0:9901"\n'
    ) == [
        (
            'proxy.toml:8: admin.listen: "0.0.0.0:9901" is already taken by '
            'server.tls.listen[0] ("127.0.0.1:9901")'
        )
    ]


@pytest.mark.parametrize(
    ("server", "admin"),
    [
        ('"127.0.0.1:8080"', '"127.0.0.1:9901"'),
        ('"127.0.0.1:0"', '"127.0.0.1:0"'),  # the kernel picks two ports
        ('"0.0.0.0:8080"', '"[::1]:8080"'),  # IPv6 listeners are IPv6-only
        ('"127.0.0.1:8080"', '"127.0.0.2:8080"'),
    ],
)
def test_listeners_on_different_addresses_are_fine(in_tmp: Path, server: str, admin: str) -> None:
    load(f"{MINIMAL}[server]\nlisten = [{server}]\n[admin]\nlisten = {admin}\n")


def test_the_access_log_folder_must_exist(in_tmp: Path) -> None:
    assert problems(MINIMAL + '[log]\naccess = "nowhere/access.log"\n') == [
        (
            f'proxy.toml:4: log.access: cannot create "{in_tmp}/nowhere/access.log": '
            f'folder "{in_tmp}/nowhere" does not exist'
        )
    ]
    (in_tmp / "logs").mkdir()
    assert problems(MINIMAL + '[log]\naccess = "logs"\n') == [
        f'proxy.toml:4: log.access: "{in_tmp}/logs" is a directory'
    ]
    assert load(MINIMAL + '[log]\naccess = "logs/access.log"\n').log.access == str(
        in_tmp / "logs" / "access.log"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_the_access_log_must_be_writable(in_tmp: Path) -> None:
    (in_tmp / "logs").mkdir(mode=0o500)
    (in_tmp / "access.log").touch(mode=0o400)
    assert problems(MINIMAL + '[log]\naccess = "logs/access.log"\n') == [
        (
            f'proxy.toml:4: log.access: cannot create "{in_tmp}/logs/access.log": '
            f'folder "{in_tmp}/logs" is not writable'
        )
    ]
    assert problems(MINIMAL + '[log]\naccess = "access.log"\n') == [
        f'proxy.toml:4: log.access: cannot write to "{in_tmp}/access.log": permission denied'
    ]


@pytest.mark.skipif(os.access("/proc/sys", os.W_OK), reason="needs a folder root cannot write")
def test_an_unwritable_access_log_folder_is_reported(in_tmp: Path) -> None:
    assert problems(MINIMAL + '[log]\naccess = "/proc/sys/access.log"\n') == [
        (
            'proxy.toml:4: log.access: cannot create "/proc/sys/access.log": '
            'folder "/proc/sys" is not writable'
        )
    ]


def test_a_star_listens_on_every_interface_and_is_not_an_upstream(in_tmp: Path) -> None:
    config = load(MINIMAL + '[server]\nlisten = ["*:8080"]\n')
    assert config.server.listen == (ServerAddress("", 8080),)
    assert str(config.server.listen[0]) == "*:8080"
    assert problems('[upstreams.app]\nservers = ["*:9000"]\n') == [
        (
            'proxy.toml:2: upstreams.app.servers[0]: bad address "*:9000": '
            '"*" is for listen addresses only'
        )
    ]


def test_host_header_is_a_host_name(in_tmp: Path) -> None:
    config = load('[upstreams.app]\nservers = ["127.0.0.1:9000"]\nhost_header = "app.test:8443"\n')
    assert config.upstreams["app"].host_header == "app.test:8443"
    assert problems('[upstreams.app]\nservers = ["127.0.0.1:9000"]\nhost_header = "a b"\n') == [
        (
            'proxy.toml:3: upstreams.app.host_header: expected a host name, with an optional ":port"; '
            'got "a b"'
        )
    ]
    # The grammar a client's Host is held to: one port, digits only; an IP literal in [].
    for bad in ("a:b:8443", "app.test:80a", ":8443", "[app.test]", "app%zz"):
        config_text = f'[upstreams.app]\nservers = ["127.0.0.1:9000"]\nhost_header = "{bad}"\n'
        assert problems(config_text) == [
            (
                "proxy.toml:3: upstreams.app.host_header: expected a host name, with an optional "
                f'":port"; got "{bad}"'
            )
        ]
    config = load('[upstreams.app]\nservers = ["127.0.0.1:9000"]\nhost_header = "[::1]:8443"\n')
    assert config.upstreams["app"].host_header == "[::1]:8443"


def test_parse_config_from_text(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    text = MINIMAL + '[server.tls]\nlisten = ["0.0.0.0:8443"]\ncert = "c.pem"\nkey = "c.pem"\n'
    config = parse_config(text, base_dir=tmp_path)
    assert config.path is None
    assert config.server.tls is not None and config.server.tls.cert == tmp_path / "c.pem"
    with pytest.raises(ConfigError) as info:
        parse_config("[server]\nworkers = 0\n" + MINIMAL)
    assert str(info.value) == "<config>:2: server.workers: must be at least 1, got 0"


# ---------------------------------------------------------------------------------- problems

ERROR_CASES = [
    pytest.param(
        "[server]\nworkers = 2\n\n[upstreams.api]\nservers = ['127.0.0.1:9000']\nmax_conections = 5\n",
        "proxy.toml:6: upstreams.api.max_conections: unknown key (did you mean max_connections?)",
        id="unknown-key-with-hint",
    ),
    pytest.param(
        MINIMAL + "[logging]\nlevel = 'info'\n",
        "proxy.toml:3: logging: unknown key (did you mean log?)",
        id="unknown-table",
    ),
    pytest.param(
        MINIMAL + "colour = 'blue'\n",
        "proxy.toml:3: upstreams.api.colour: unknown key",
        id="unknown-key-no-hint",
    ),
    pytest.param(
        MINIMAL + '[server]\nheader_timeout = "10"\n',
        'proxy.toml:4: server.header_timeout: bad duration "10": expected a number with a unit ms, s, m or h',
        id="bad-duration",
    ),
    pytest.param(
        MINIMAL + "[server]\nheader_timeout = 10\n",
        'proxy.toml:4: server.header_timeout: expected a duration string such as "10s", got integer',
        id="duration-not-a-string",
    ),
    pytest.param(
        MINIMAL + '[server]\nheader_timeout = "0s"\n',
        'proxy.toml:4: server.header_timeout: must be more than 0s, got "0s"',
        id="zero-duration",
    ),
    pytest.param(
        MINIMAL + '[server]\nmax_body_bytes = "1MB"\n',
        "proxy.toml:4: server.max_body_bytes: expected an integer, got string",
        id="string-for-int",
    ),
    pytest.param(
        MINIMAL + "[server]\nworkers = true\n",
        "proxy.toml:4: server.workers: expected an integer, got boolean",
        id="bool-is-not-int",
    ),
    pytest.param(
        MINIMAL + "max_connections = 10.0\n",
        "proxy.toml:3: upstreams.api.max_connections: expected an integer, got float",
        id="float-for-int",
    ),
    pytest.param(
        MINIMAL + "max_connections = 0\n",
        "proxy.toml:3: upstreams.api.max_connections: must be at least 1, got 0",
        id="non-positive-max-connections",
    ),
    pytest.param(
        MINIMAL + "max_idle = -1\n",
        "proxy.toml:3: upstreams.api.max_idle: must be at least 0, got -1",
        id="negative-max-idle",
    ),
    pytest.param(
        MINIMAL + "queue_size = -5\n",
        "proxy.toml:3: upstreams.api.queue_size: must be at least 0, got -5",
        id="negative-queue-size",
    ),
    pytest.param(
        MINIMAL + "[server]\nworkers = 0\n",
        "proxy.toml:4: server.workers: must be at least 1, got 0",
        id="zero-workers",
    ),
    pytest.param(
        MINIMAL + "balance = 'random'\n",
        'proxy.toml:3: upstreams.api.balance: must be one of round_robin, least_conn; got "random"',
        id="bad-balance",
    ),
    pytest.param(
        MINIMAL + "[log]\nformat = 'xml'\n",
        'proxy.toml:4: log.format: must be one of json, combined; got "xml"',
        id="bad-log-format",
    ),
    pytest.param(
        MINIMAL + "[log]\nlevel = 'verbose'\n",
        'proxy.toml:4: log.level: must be one of debug, info, warning, error; got "verbose"',
        id="bad-log-level",
    ),
    pytest.param(
        MINIMAL + "[server]\nlisten = ['0.0.0.0:70000']\n",
        'proxy.toml:4: server.listen[0]: bad address "0.0.0.0:70000": the port must be a number from 0 to 65535',
        id="port-out-of-range",
    ),
    pytest.param(
        "[upstreams.api]\nservers = ['127.0.0.1:0']\n",
        'proxy.toml:2: upstreams.api.servers[0]: bad address "127.0.0.1:0": the port must be from 1 to 65535',
        id="upstream-port-zero",
    ),
    pytest.param(
        "[upstreams.api]\nservers = [\n  '127.0.0.1:9000',\n  'backend',\n]\n",
        'proxy.toml:4: upstreams.api.servers[1]: bad address "backend": missing port',
        id="server-missing-port-multiline",
    ),
    pytest.param(
        "[upstreams.api]\nservers = ['h:1', 'h:2']\nnext_server_tries = 0\n",
        "proxy.toml:3: upstreams.api.next_server_tries: must be at least 1, got 0",
        id="next-server-tries-zero",
    ),
    pytest.param(
        "[upstreams.api]\nservers = ['h:1', 'h:2']\n\nnext_server_tries = 'all'\n",
        "proxy.toml:4: upstreams.api.next_server_tries: expected an integer, got string",
        id="next-server-tries-not-a-number",
    ),
    pytest.param(
        "[upstreams.api]\nservers = []\n",
        "proxy.toml:2: upstreams.api.servers: must list at least one server",
        id="empty-servers",
    ),
    pytest.param(
        "[upstreams.api]\nservers = '127.0.0.1:9000'\n",
        'proxy.toml:2: upstreams.api.servers: expected an array of "host:port" strings, got string',
        id="servers-not-a-list",
    ),
    pytest.param(
        "# upstreams\n[upstreams.api]\nmax_idle = 1\n",
        "proxy.toml:2: upstreams.api.servers: missing required key",
        id="missing-servers-points-at-header",
    ),
    pytest.param(
        MINIMAL + "\n[[routes]]\npath_prefix = '/x'\nupstream = 'apii'\n",
        'proxy.toml:6: routes[0].upstream: unknown upstream "apii" (did you mean api?)',
        id="route-unknown-upstream",
    ),
    pytest.param(
        MINIMAL + "\n[[routes]]\npath_prefix = '/x'\n",
        "proxy.toml:4: routes[0].upstream: missing required key",
        id="route-missing-upstream",
    ),
    pytest.param(
        MINIMAL
        + "[[routes]]\nupstream = 'api'\n[[routes]]\nupstream = 'api'\npath_prefix = 'api/'\n",
        'proxy.toml:7: routes[1].path_prefix: must start with "/", got "api/"',
        id="path-prefix-without-slash",
    ),
    pytest.param(
        MINIMAL + "[[routes]]\nupstream = 'api'\nhost = 'api.*.com'\n",
        'proxy.toml:5: routes[0].host: a wildcard is only allowed as a leading "*.", got "api.*.com"',
        id="bad-wildcard",
    ),
    pytest.param(
        MINIMAL + "[[routes]]\nupstream = 'api'\nstrip_prefix = 'yes'\n",
        "proxy.toml:5: routes[0].strip_prefix: expected true or false, got string",
        id="bool-field",
    ),
    pytest.param(
        "[server]\nworkers = 1\n",
        "proxy.toml:1: upstreams: no upstreams defined: add an [upstreams.NAME] table",
        id="no-upstreams",
    ),
    pytest.param(
        MINIMAL + "[upstreams.web]\nservers = ['127.0.0.1:9001']\n",
        "proxy.toml:1: routes: no routes: with several upstreams, add [[routes]] tables",
        id="several-upstreams-no-routes",
    ),
    pytest.param(
        MINIMAL + "[server]\nlisten = []\n",
        "proxy.toml:4: server.listen: is empty: set [server.tls] to serve TLS only",
        id="listen-empty-without-tls",
    ),
    pytest.param(
        MINIMAL + "[server]\nlisten = ['http://0.0.0.0:80']\n",
        'proxy.toml:4: server.listen[0]: bad address "http://0.0.0.0:80": a listen address takes no scheme',
        id="listen-with-scheme",
    ),
    pytest.param(
        MINIMAL + "[admin]\n",
        "proxy.toml:3: admin.listen: missing required key",
        id="admin-missing-listen",
    ),
    pytest.param(
        MINIMAL + "admin = 'x'\n",
        "proxy.toml:3: upstreams.api.admin: unknown key",
        id="key-in-wrong-table",
    ),
    pytest.param(
        "admin = 'x'\n" + MINIMAL,
        "proxy.toml:1: admin: expected a table, got string",
        id="table-expected",
    ),
    pytest.param(
        MINIMAL
        + "[server.tls]\nlisten = ['0.0.0.0:8443']\ncert = 'missing.pem'\nkey = 'key.pem'\n",
        'proxy.toml:5: server.tls.cert: cannot read "{tmp}/missing.pem": No such file or directory',
        id="tls-cert-unreadable",
    ),
    pytest.param(
        MINIMAL + "[server.tls]\nlisten = ['0.0.0.0:8443']\ncert = 'cert.pem'\nkey = '.'\n",
        'proxy.toml:6: server.tls.key: cannot read "{tmp}": Is a directory',
        id="tls-key-is-a-directory",
    ),
    pytest.param(
        MINIMAL + "[server.tls]\ncert = 'cert.pem'\nkey = 'key.pem'\n",
        "proxy.toml:3: server.tls.listen: missing required key",
        id="tls-missing-listen",
    ),
    pytest.param(
        MINIMAL + "[server]\nrequest_id = 'yes'\n",
        "proxy.toml:4: server.request_id: expected true or false, got string",
        id="request-id-not-bool",
    ),
    pytest.param(
        MINIMAL + "[server]\nrequest_id_header = 'X Request ID'\n",
        'proxy.toml:4: server.request_id_header: "X Request ID" is not a header name '
        "(letters, digits and -!#$%&'*+.^_`|~)",
        id="request-id-header-not-a-name",
    ),
    pytest.param(
        MINIMAL + "[server]\nrequest_id_header = 'Traceparent'\n",
        'proxy.toml:4: server.request_id_header: "Traceparent" is a header the proxy handles '
        "itself",
        id="request-id-header-reserved",
    ),
    pytest.param(
        MINIMAL + "health_check = { path = 'healthz' }\n",
        'proxy.toml:3: upstreams.api.health_check.path: must start with "/" and have no spaces '
        'or controls, got "healthz"',
        id="health-check-path",
    ),
    pytest.param(
        MINIMAL + "[upstreams.api.health_check]\nexpect_status = '200-99'\n",
        "proxy.toml:4: upstreams.api.health_check.expect_status: expected status codes or ranges "
        'from 100 to 599 such as "200-399", got "200-99"',
        id="health-check-status-range",
    ),
    pytest.param(
        MINIMAL + "health_check = { intervall = '1s' }\n",
        "proxy.toml:3: upstreams.api.health_check.intervall: unknown key (did you mean interval?)",
        id="health-check-unknown-key",
    ),
    pytest.param(
        MINIMAL + "[upstreams.api.health_check]\ninterval = '1s'\ntimeout = '2s'\n",
        "proxy.toml:5: upstreams.api.health_check.timeout: must not be longer than interval (1s)",
        id="health-check-timeout-over-interval",
    ),
    pytest.param(
        MINIMAL + "[upstreams.api.health_check]\nfall = 0\n",
        "proxy.toml:4: upstreams.api.health_check.fall: must be at least 1, got 0",
        id="health-check-fall-zero",
    ),
    pytest.param(
        MINIMAL + "health_check = true\n",
        "proxy.toml:3: upstreams.api.health_check: expected a table, got boolean",
        id="health-check-not-a-table",
    ),
    pytest.param(
        MINIMAL + "[admin]\nlisten = '127.0.0.1:9901'\nready_requires_healthy_upstreams = 1\n",
        "proxy.toml:5: admin.ready_requires_healthy_upstreams: expected true or false, got integer",
        id="ready-requires-not-bool",
    ),
    pytest.param(
        '[upstreams.a]\nservers = ["h2c://h:1"]\nprotocol = "http/1.1"\n',
        'proxy.toml:3: upstreams.a.protocol: is "http/1.1", but h2c:// servers speak HTTP/2',
        id="h2c-server-with-protocol-http1",
    ),
    pytest.param(
        '[upstreams.a]\nservers = [\n  "h2c://h:1",\n  "http://h:2",\n]\n',
        "proxy.toml:4: upstreams.a.servers[1]: is HTTP/1.1 among h2c:// servers: one upstream "
        'speaks one protocol (set protocol = "h2" to speak HTTP/2 to http:// and https:// '
        "servers too)",
        id="h2c-mixed-with-http1",
    ),
    pytest.param(
        '[upstreams.a]\nservers = ["h:1"]\nprotocol = "h3"\n',
        'proxy.toml:3: upstreams.a.protocol: must be one of http/1.1, h2; got "h3"',
        id="unknown-protocol",
    ),
    pytest.param(
        '[upstreams."my.api"]\nservers = ["h:1"]\nbalance = 1\n',
        'proxy.toml:3: upstreams."my.api".balance: expected a string, got integer',
        id="quoted-table-name",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERROR_CASES)
def test_each_problem_is_reported_exactly(in_tmp: Path, text: str, expected: str) -> None:
    assert problems(text) == [expected.format(tmp=in_tmp)]


def test_all_problems_are_reported_in_line_order(in_tmp: Path) -> None:
    assert problems(
        """\
        [[routes]]
        upstream = "nope"

        [server]
        workers = 0
        keepalive_timeout = "5 minutes"

        [upstreams.api]
        servers = ["127.0.0.1:9000"]
        max_conections = 10

        [log]
        level = "loud"
        """
    ) == [
        'proxy.toml:2: routes[0].upstream: unknown upstream "nope"',
        "proxy.toml:5: server.workers: must be at least 1, got 0",
        (
            'proxy.toml:6: server.keepalive_timeout: bad duration "5 minutes": '
            "expected a number with a unit ms, s, m or h"
        ),
        "proxy.toml:10: upstreams.api.max_conections: unknown key (did you mean max_connections?)",
        'proxy.toml:13: log.level: must be one of debug, info, warning, error; got "loud"',
    ]


def test_lines_survive_comments_strings_and_multiline_values(in_tmp: Path) -> None:
    assert problems(
        """\
        # a comment with = and [brackets] and [[arrays]]
        [server]  # [not.a.table]
        listen = [
          "127.0.0.1:8080",  # x = 1
          "[::1]:8081",
        ]
        note = \"\"\"
        [upstreams.fake]
        workers = 0 # inside a string
        \"\"\"
        "quoted.key" = 'literal [with] = signs'
        server.workers = 2

        [upstreams.api]
        servers = ["127.0.0.1:9000"]
        inline = { a = 1, b = [1, 2] }
        settings.max_idle = -1

        [[routes]]
        upstream = "api"
        path_prefix = "nope"
        """
    ) == [
        "proxy.toml:7: server.note: unknown key",
        'proxy.toml:11: server."quoted.key": unknown key',
        "proxy.toml:12: server.server: unknown key",
        "proxy.toml:16: upstreams.api.inline: unknown key",
        "proxy.toml:17: upstreams.api.settings: unknown key",
        'proxy.toml:21: routes[0].path_prefix: must start with "/", got "nope"',
    ]


def test_routes_as_inline_array_of_tables(in_tmp: Path) -> None:
    assert problems(
        'routes = [\n  { upstream = "api" },\n  { upstream = "apx", path_prefix = "/b" },\n]\n'
        + MINIMAL
    ) == ['proxy.toml:3: routes[1].upstream: unknown upstream "apx" (did you mean api?)']


def test_unreadable_file(in_tmp: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("missing.toml")
    assert info.value.problems == [
        ConfigProblem("missing.toml", 1, "(file)", "cannot read: No such file or directory")
    ]
    Path("latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config("latin1.toml")
    assert str(info.value).startswith("latin1.toml:1: (file): not UTF-8 text")


@pytest.mark.parametrize(
    ("text", "prefix", "suffix"),
    [
        (MINIMAL + "[upstreams.api]\n", "proxy.toml:3: (syntax): Cannot declare", "(column 15)"),
        ("[server]\nworkers = = 1\n", "proxy.toml:2: (syntax): ", "(column 11)"),
        ('[server]\nlisten = ["a:1",\n', "proxy.toml:2: (syntax): ", "(at end of file)"),
        ("[server\n", "proxy.toml:1: (syntax): ", ""),
    ],
)
def test_syntax_errors_use_tomllibs_line(in_tmp: Path, text: str, prefix: str, suffix: str) -> None:
    """tomllib's wording may change between Pythons; the line and the key must not."""
    [problem] = problems(text)
    assert problem.startswith(prefix) and problem.endswith(suffix)


# ------------------------------------------------------------------------- durations, addresses


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("0s", 0.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0.1h", 360.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10", "expected a number with a unit ms, s, m or h"),
        ("", "expected a number with a unit ms, s, m or h"),
        ("10d", "expected a number with a unit ms, s, m or h"),
        ("10 s", "expected a number with a unit ms, s, m or h"),
        ("1e3ms", "expected a number with a unit ms, s, m or h"),
        ("s", "expected a number with a unit ms, s, m or h"),
        ("1.s", "expected a number with a unit ms, s, m or h"),
        ("inf s", "expected a number with a unit ms, s, m or h"),
        ("-1s", "must not be negative"),
    ],
)
def test_parse_duration_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f'bad duration "{text}": {why}'


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("127.0.0.1:8080", None, ServerAddress("127.0.0.1", 8080)),
        ("localhost:0", None, ServerAddress("localhost", 0)),
        ("[::1]:8080", None, ServerAddress("::1", 8080)),
        ("[::1]", 9000, ServerAddress("::1", 9000)),
        ("example.com", 81, ServerAddress("example.com", 81)),
        ("http://h:8000", None, ServerAddress("h", 8000)),
        ("http://h", None, ServerAddress("h", 80)),
        ("http://h/", 1234, ServerAddress("h", 80)),
        ("https://h", None, ServerAddress("h", 443, tls=True)),
        ("HTTPS://[::1]:8443", None, ServerAddress("::1", 8443, tls=True)),
        ("h2c://h:50051", None, ServerAddress("h", 50051, h2=True)),
        ("h2c://h", None, ServerAddress("h", 80, h2=True)),
    ],
)
def test_parse_address(text: str, default_port: int | None, expected: ServerAddress) -> None:
    assert parse_address(text, default_port=default_port) == expected


@pytest.mark.parametrize(
    "text",
    ["", "host", ":80", "::1:80", "h:80x", "h:65536", "ftp://h:1", "http://h/path", "[::1", "h :1"],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(f'bad address "{text}": ')):
        parse_address(text)


def test_server_address_str() -> None:
    assert str(ServerAddress("127.0.0.1", 9000)) == "127.0.0.1:9000"
    assert str(ServerAddress("::1", 9000, tls=True)) == "[::1]:9000"


# ---------------------------------------------------------------------------------- dev_config


def test_dev_config() -> None:
    config = dev_config("http://localhost:9000", listen="0.0.0.0:8000")
    assert config.server.listen == (ServerAddress("0.0.0.0", 8000),)
    assert config.log == LogConfig(format="combined")
    assert config.routes == (RouteConfig(upstream="app"),)
    assert config.upstreams["app"].servers == (ServerAddress("localhost", 9000),)
    assert config.upstreams["app"].host_header is None
    assert dev_config("https://example.com").upstreams["app"].servers == (
        ServerAddress("example.com", 443, tls=True),
    )
    assert dev_config("127.0.0.1:1").server.listen == (ServerAddress("127.0.0.1", 8080),)
    with pytest.raises(ValueError, match="missing port"):
        dev_config("localhost")


def test_dev_config_has_the_settings_of_config_dev_toml() -> None:
    """``pooled-proxy dev`` is what config/dev.toml says it is (its drain_timeout included)."""
    dev_toml = load_config(Path(__file__).parents[2] / "config" / "dev.toml")
    config = dev_config("127.0.0.1:3000")
    assert config.server == dev_toml.server
    assert config.server.drain_timeout == 2.0
    assert config.upstreams["app"] == dev_toml.upstreams["app"]
    assert config.routes == dev_toml.routes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3000", ServerAddress("localhost", 3000)),
        (":3000", ServerAddress("localhost", 3000)),
        ("127.0.0.1:3000", ServerAddress("127.0.0.1", 3000)),
        ("https://remote.example", ServerAddress("remote.example", 443, tls=True)),
    ],
)
def test_dev_upstream_takes_caddys_shorthand(text: str, expected: ServerAddress) -> None:
    assert dev_upstream(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080", ServerAddress("127.0.0.1", 8080)),
        (":8080", ServerAddress("127.0.0.1", 8080)),
        ("0.0.0.0:8080", ServerAddress("0.0.0.0", 8080)),
        ("*:8080", ServerAddress("", 8080)),
    ],
)
def test_dev_listen_takes_a_port_alone(text: str, expected: ServerAddress) -> None:
    assert dev_listen(text) == expected


def test_dev_config_routes_two_apps_longest_prefix_first() -> None:
    config = dev_config(
        "3000",
        routes=[("/api", "3001"), ("/api/admin", "http://127.0.0.1:3002")],
        change_host_header=True,
    )
    assert [(r.path_prefix, r.upstream) for r in config.routes] == [
        ("/api/admin", "api_admin"), ("/api", "api"), ("/", "app"),
    ]  # fmt: skip
    assert config.upstreams["api"].servers == (ServerAddress("localhost", 3001),)
    assert config.upstreams["api"].host_header == "localhost:3001"
    assert (
        dev_config("https://remote.example", change_host_header=True).upstreams["app"].host_header
        == "remote.example"
    )  # the scheme's port is left out, as browsers do
    with pytest.raises(ValueError, match='must start with "/"'):
        dev_config("3000", routes=[("api", "3001")])
    with pytest.raises(ValueError, match="given twice"):
        dev_config("3000", routes=[("/", "3001")])
    with pytest.raises(ValueError, match="no upstream"):
        dev_config(None)


# ---------------------------------------------------------------------------------- layering


def test_config_module_does_not_import_trio() -> None:
    tree = ast.parse(Path(config_module.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] == "trio"}


def test_lines_survive_crlf_escapes_and_literal_strings() -> None:
    text = (
        "[server]\r\nnote = \"a \\\" = [b\"\r\npath = 'C:\\dir\\'\r\nml = '''\r\nx = [\r\n'''''\r\n"
        'workers = 0\r\n[ upstreams . "a b" ]\r\nservers = ["h:1"] \r\nt = { b.c = 1, d = "}" }\r\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert [str(p) for p in info.value.problems] == [
        "<config>:2: server.note: unknown key",
        "<config>:3: server.path: unknown key",
        "<config>:4: server.ml: unknown key",
        "<config>:7: server.workers: must be at least 1, got 0",
        '<config>:10: upstreams."a b".t: unknown key',
    ]


def test_upstream_protocol(in_tmp: Path) -> None:
    """h2c:// servers make an HTTP/2 upstream; protocol = "h2" makes every server one (TLS
    with ALPN h2 for https://, prior knowledge for http://); the default is HTTP/1.1."""
    config = load(
        """\
        [upstreams.grpc]
        servers = ["h2c://10.0.0.5:50051", "h2c://10.0.0.6:50051"]
        [upstreams.tls]
        servers = ["https://api.internal", "http://10.0.0.7:8080"]
        protocol = "h2"
        [upstreams.web]
        servers = ["10.0.0.8:80"]
        [[routes]]
        upstream = "web"
        """
    )
    grpc, tls, web = (config.upstreams[name] for name in ("grpc", "tls", "web"))
    assert grpc.protocol == tls.protocol == "h2"
    assert [s.h2 for s in grpc.servers + tls.servers] == [True] * 4
    assert [s.tls for s in tls.servers] == [True, False]
    assert (web.protocol, web.servers[0].h2) == ("http/1.1", False)


def test_dev_config_takes_an_h2c_upstream() -> None:
    app = dev_config("h2c://localhost:50051").upstreams["app"]
    assert (app.protocol, app.servers) == ("h2", (ServerAddress("localhost", 50051, h2=True),))
