"""TOML config -> frozen dataclasses, or one ConfigError naming every problem by file, line and key.

Why this shape: the config is read before anything listens (and again on SIGHUP), so a bad file
must fail completely and precisely: every problem at once, each as ``FILE:LINE: dotted.key:
message``, so an operator fixes the whole file in one pass. tomllib gives values but no
positions, hence the small ``_LineIndex``. This module is pure (no trio); its only I/O is reading
the file, checking that the TLS files can be opened and that the access log can be written:
what ``run`` would trip over after listening is found here, where ``check`` sees it too.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError, ConfigProblem
from .protocol.abnf import AUTHORITY, ORIGIN_FORM, TOKEN

DEFAULT_LISTEN = ("127.0.0.1:8080",)
# The servers a request tries by default before its failure is answered. Each try may cost a
# whole connect_timeout; three failing at once is an outage, which more tries only make the
# client wait longer to hear about.
NEXT_SERVER_TRIES = 3
ANY_HOST = "*"  # a listen host: every interface, IPv4 and IPv6


@dataclass(frozen=True, slots=True)
class ServerAddress:
    """One upstream server or one listen address; ``tls`` is set by an ``https://`` prefix,
    ``h2`` (the server speaks HTTP/2) by an ``h2c://`` prefix or its upstream's ``protocol``.

    A listen address's empty ``host`` (written ``*``) is every interface of every address
    family the system has: IPv4, and IPv6 where there is IPv6.
    """

    host: str
    port: int
    tls: bool = False
    h2: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host or ANY_HOST
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    listen: tuple[ServerAddress, ...]
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    listen: tuple[ServerAddress, ...] = (ServerAddress("127.0.0.1", 8080),)
    workers: int = 1
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0  # longest silence inside a request body
    write_timeout: float = 60.0  # a client that stops reading a response
    max_header_bytes: int = 65536
    max_header_count: int = 100
    max_body_bytes: int = 0  # 0 = no limit
    max_connections: int = 10000  # client connections per process
    max_requests_per_connection: int = 0  # client side, 0 = unlimited
    max_concurrent_streams: int = 100  # HTTP/2
    drain_timeout: float = 30.0
    hook_timeout: float = 1.0  # a route's hook running longer is cancelled: 504
    tls: TlsConfig | None = None
    request_id: bool = True  # every request gets an ID, sent upstream, returned and logged
    request_id_header: str = "x-request-id"  # lower-case


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    listen: ServerAddress
    # /readyz answers 503 while an upstream has no server in rotation (health checks).
    ready_requires_healthy_upstreams: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    access: str = "stdout"  # "stdout" | "off" | an absolute file path
    format: str = "json"  # "json" | "combined"
    level: str = "info"  # debug | info | warning | error


DEFAULT_MASKED_HEADERS = ("authorization", "cookie", "set-cookie", "proxy-authorization")


@dataclass(frozen=True, slots=True, kw_only=True)
class InspectConfig:
    """The request inspector, served on the admin listener (``pooled-proxy dev`` turns it on)."""

    enabled: bool = False
    keep: int = 200  # the last exchanges kept
    max_body_bytes: int = 65536  # of each body, the start kept for viewing
    mask_headers: tuple[str, ...] = DEFAULT_MASKED_HEADERS  # lower-case; values never shown


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    """Active health checks of each server of an upstream: ``GET path`` every ``interval``."""

    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0  # connect and response head, together
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive ranges
    rise: int = 2  # passed probes in a row that bring a server back
    fall: int = 3  # failed probes in a row that take it out

    def expects(self, status: int) -> bool:
        return any(low <= status <= high for low, high in self.expect_status)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    name: str
    servers: tuple[ServerAddress, ...]
    balance: str = "round_robin"  # or "least_conn"
    protocol: str = "http/1.1"  # or "h2": every server speaks HTTP/2 (ServerAddress.h2)
    max_connections: int = 100  # per server, in use + idle
    max_idle: int = 32
    idle_timeout: float = 60.0
    connect_timeout: float = 3.0
    response_header_timeout: float = 30.0
    read_timeout: float = 300.0  # 0.0 = none
    queue_size: int = 1024
    queue_timeout: float = 5.0
    max_requests_per_connection: int = 0  # 0 = unlimited
    max_fails: int = 3  # passive health: this many failures within fail_window ...
    fail_window: float = 10.0
    fail_timeout: float = 10.0  # ... skip the server this long (only when > 1 server)
    # The most servers one request tries when they fail before it went up (``server_tries``);
    # None: the default, every server up to NEXT_SERVER_TRIES.
    next_server_tries: int | None = None
    host_header: str | None = None  # sent as Host instead of the client's
    # TLS to its https:// servers (tls_contexts.py builds the context once per load).
    tls_ca: Path | None = None  # trust only this CA bundle (default: the system's CAs)
    tls_server_name: str | None = None  # SNI and the name the certificate must carry
    tls_verify: bool = True  # false: any certificate is accepted (development only)
    tls_cert: Path | None = None  # a client certificate (mutual TLS), with tls_key
    tls_key: Path | None = None
    health_check: HealthCheckConfig | None = None  # active health checks, when set

    @property
    def tls(self) -> bool:
        """Some server of it is ``https://``."""
        return any(server.tls for server in self.servers)

    @property
    def server_tries(self) -> int:
        """The most servers one request tries: ``next_server_tries``, or by default each
        server up to ``NEXT_SERVER_TRIES``; never more than the upstream has."""
        return min(len(self.servers), self.next_server_tries or NEXT_SERVER_TRIES)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    upstream: str
    host: str | None = None  # exact, or "*.example.com"; lower-case
    path_prefix: str = "/"
    strip_prefix: bool = False
    hooks: tuple[str, ...] = ()  # "module:function" of each hook, run in this order
    hook_timeout: float | None = None  # None: the [server] hook_timeout


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig | None = None
    log: LogConfig = LogConfig()
    inspect: InspectConfig = InspectConfig()
    upstreams: Mapping[str, UpstreamConfig]  # a read-only MappingProxyType
    routes: tuple[RouteConfig, ...]
    path: Path | None = None  # the file it came from


# ---------------------------------------------------------------------------------- scalars

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|s|m|h)")
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """``"250ms"``, ``"1.5s"``, ``"5m"``, ``"1h"`` -> seconds. A unit is mandatory, so that
    ``timeout = "10"`` can never silently mean ten milliseconds or ten minutes."""
    match = _DURATION.fullmatch(value)
    if match is None:
        negative = value.startswith("-") and _DURATION.fullmatch(value[1:]) is not None
        why = "must not be negative" if negative else "expected a number with a unit ms, s, m or h"
        raise ValueError(f'bad duration "{value}": {why}')
    number, unit = float(match[1]), match[2]
    return number / 1000 if unit == "ms" else number * _UNIT_SECONDS[unit]


# prefix -> (TLS, default port, HTTP/2 with prior knowledge)
_SCHEMES = {
    "http://": (False, 80, False),
    "https://": (True, 443, False),
    "h2c://": (False, 80, True),
}


def parse_address(value: str, *, default_port: int | None = None) -> ServerAddress:
    """``"127.0.0.1:8080"``, ``"[::1]:8080"``, ``"*:8080"``, ``"http://h:p"``, ``"https://h"``,
    ``"h2c://h:p"`` -> address (``*`` gives the empty host: every interface).

    A scheme sets ``tls``, ``h2`` and the default port (80/443); without one the port is
    required unless ``default_port`` is given. Port 0 is accepted (tests listen on it); callers that
    connect reject it themselves.
    """

    def bad(why: str) -> ValueError:
        return ValueError(f'bad address "{value}": {why}')

    rest, tls, h2 = value, False, False
    for prefix, (scheme_tls, scheme_port, scheme_h2) in _SCHEMES.items():
        if value.lower().startswith(prefix):
            rest, tls, h2, default_port = value[len(prefix) :], scheme_tls, scheme_h2, scheme_port
            rest = rest.removesuffix("/")
            break
    else:
        if "://" in value:
            raise bad("the scheme must be http://, https:// or h2c://")
    if not rest or any(ch in rest for ch in "/?#@ \t"):
        raise bad("expected host:port")
    port_text: str | None
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise bad("expected [ipv6]:port")
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        raise bad("an IPv6 address needs brackets, e.g. [::1]:8080")
    else:
        host, colon, port_text = rest.partition(":")
        port_text = port_text if colon else None
    if not host:
        raise bad("missing host")
    if host == ANY_HOST:
        host = ""
    if port_text is None:
        if default_port is None:
            raise bad("missing port")
        return ServerAddress(host, default_port, tls, h2)
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise bad("the port must be a number from 0 to 65535")
    return ServerAddress(host, int(port_text), tls, h2)


# ------------------------------------------------------------------------------ line index

_KeyPath = tuple[str | int, ...]
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}\n#]+")


class _LineIndex:
    """Maps a key path such as ``("routes", 0, "upstream")`` to the line it was written on.

    It scans the source once, as a TOML parser would (headers, ``[[arrays]]`` with their index,
    dotted keys, strings, multi-line arrays, inline tables), but only after tomllib accepted the
    file, so it can be lenient. Lookups fall back to the enclosing table's header, then line 1.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self._lines: dict[_KeyPath, int] = {}
        self._arrays: dict[_KeyPath, int] = {}  # array-of-tables path -> its last index
        try:
            self._scan()
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass  # best effort: what was indexed still serves, the rest falls back

    def line_of(self, path: _KeyPath) -> int:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return 1

    def _line(self) -> int:
        return bisect_left(self._newlines, self._pos) + 1

    def _peek(self, size: int = 1) -> str:
        return self._text[self._pos : self._pos + size]

    def _skip(self, *, newlines: bool) -> None:
        text = self._text
        while self._pos < len(text):
            ch = text[self._pos]
            if ch == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end == -1 else end
            elif ch in " \t\r" or (newlines and ch == "\n"):
                self._pos += 1
            else:
                return

    def _scan(self) -> None:
        table: _KeyPath = ()
        while True:
            self._skip(newlines=True)
            start = self._pos
            if start >= len(self._text):
                return
            if self._peek() == "[":
                table = self._header()
            else:
                self._keyval(table)
            self._skip(newlines=False)
            if self._pos == start:
                raise ValueError("indexer made no progress")

    def _header(self) -> _KeyPath:
        line = self._line()
        is_array = self._peek(2) == "[["
        self._pos += 2 if is_array else 1
        names = self._key()
        self._pos += 2 if is_array else 1
        path: _KeyPath = ()
        for i, name in enumerate(names):
            path += (name,)
            if is_array and i == len(names) - 1:
                self._arrays[path] = self._arrays.get(path, -1) + 1
                self._lines.setdefault(path, line)
                path += (self._arrays[path],)
            elif path in self._arrays:
                path += (self._arrays[path],)
            self._lines.setdefault(path, line)
        self._lines[path] = line
        return path

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip(newlines=False)
            if self._peek() in ("'", '"'):
                parts.append(tomllib.loads(f"k = {self._string()}")["k"])
            else:
                match = _BARE_KEY.match(self._text, self._pos)
                if match is None:
                    raise ValueError("expected a key")
                parts.append(match.group())
                self._pos = match.end()
            self._skip(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self._pos += 1

    def _keyval(self, table: _KeyPath) -> None:
        line = self._line()
        names = self._key()
        self._pos += 1  # "="
        self._skip(newlines=False)
        path = table
        for name in names[:-1]:
            path += (name,)
            self._lines.setdefault(path, line)
        path += (names[-1],)
        self._lines[path] = line
        self._value(path)

    def _value(self, path: _KeyPath) -> None:
        ch = self._peek()
        if not ch:
            raise IndexError("end of document inside a value")
        if ch in ("'", '"'):
            self._string()
        elif ch in "[{":
            self._pos += 1
            index = 0
            while True:
                self._skip(newlines=True)
                if self._peek() in ("]", "}"):
                    self._pos += 1
                    return
                if ch == "[":
                    self._lines[path + (index,)] = self._line()
                    self._value(path + (index,))
                    index += 1
                else:
                    self._keyval(path)
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._pos += 1
        else:
            match = _SCALAR.match(self._text, self._pos)
            if match is None:
                raise ValueError("expected a value")
            self._pos = match.end()

    def _string(self) -> str:
        """Skip one string of any of the four kinds; return its source text."""
        text, start = self._text, self._pos
        quote = next(q for q in ('"""', "'''", '"', "'") if text.startswith(q, start))
        pos = start + len(quote)
        while not text.startswith(quote, pos):
            if text[pos] == "\\" and quote[0] == '"':
                pos += 1
            pos += 1
        pos += len(quote)
        while len(quote) == 3 and text.startswith(quote[0], pos):  # up to 2 quotes end the content
            pos += 1
        self._pos = pos
        return text[start:pos]


# ------------------------------------------------------------------------------ validation

_Conv = Callable[[object], Any]


def _kind(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return "table" if isinstance(value, dict) else names.get(type(value), "date/time")


def _int(minimum: int) -> _Conv:
    def conv(value: object) -> int:
        if type(value) is not int:
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return conv


def _duration(*, zero_ok: bool) -> _Conv:
    def conv(value: object) -> float:
        if not isinstance(value, str):
            raise ValueError(f'expected a duration string such as "10s", got {_kind(value)}')
        seconds = parse_duration(value)
        if seconds == 0 and not zero_ok:
            raise ValueError(f'must be more than 0s, got "{value}"')
        return seconds

    return conv


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    if not value:
        raise ValueError("must not be empty")
    return value


def _choice(*options: str) -> _Conv:
    def conv(value: object) -> str:
        if _string(value) not in options:
            raise ValueError(f'must be one of {", ".join(options)}; got "{value}"')
        return str(value)

    return conv


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _route_host(value: object) -> str:
    host = _string(value).lower()
    if "*" in host and not (host.startswith("*.") and len(host) > 2 and "*" not in host[1:]):
        raise ValueError(f'a wildcard is only allowed as a leading "*.", got "{value}"')
    return host


_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def _server_name(value: object) -> str:
    name = _string(value)
    if not _HOSTNAME.fullmatch(name):
        raise ValueError(f'expected a DNS name such as "api.internal", got "{value}"')
    return name


# The grammar the proxy holds a client's Host to, for the Host it sends in a client's place.
_AUTHORITY = re.compile(AUTHORITY.decode("ascii"))


def _host_header(value: object) -> str:
    if not _AUTHORITY.fullmatch(_string(value)):
        raise ValueError(f'expected a host name, with an optional ":port"; got "{value}"')
    return str(value)


# Fields the proxy frames, routes or rewrites itself: a request ID cannot travel in them.
_RESERVED_FIELDS = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length", "content-type", "expect", "via", "x-forwarded-for",
    "x-forwarded-proto", "x-forwarded-host", "traceparent", "tracestate",
})  # fmt: skip
_FIELD_NAME = re.compile(TOKEN.decode("ascii"))


def _header_name(value: object) -> str:
    name = _string(value)
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f'"{value}" is not a header name (letters, digits and -!#$%&\'*+.^_`|~)')
    if name.lower() in _RESERVED_FIELDS:
        raise ValueError(f'"{value}" is a header the proxy handles itself')
    return name.lower()


_ORIGIN_FORM = re.compile(ORIGIN_FORM.decode("ascii"))


def _probe_path(value: object) -> str:
    path = _string(value)
    if not _ORIGIN_FORM.fullmatch(path):
        raise ValueError(f'must start with "/" and have no spaces or controls, got "{value}"')
    return path


def _status_ranges(value: object) -> tuple[tuple[int, int], ...]:
    """``200``, ``"200-399"``, ``"200, 204, 300-302"`` -> inclusive ranges."""
    text = str(value) if type(value) is int else _string(value)
    ranges = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            bounds = (int(low), int(high) if dash else int(low))
        except ValueError:
            bounds = (0, 0)
        if not (100 <= bounds[0] <= bounds[1] <= 599):
            raise ValueError(
                f'expected status codes or ranges from 100 to 599 such as "200-399", got "{value}"'
            )
        ranges.append(bounds)
    return tuple(ranges)


# A hook's "module:function": dotted Python names on each side (a class attribute is reachable
# as "module:Class.method").
_HOOK_SPEC = re.compile(
    r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", re.ASCII
)


def _hook_spec(value: object) -> str:
    if not _HOOK_SPEC.fullmatch(_string(value)):
        raise ValueError(
            f'expected "module:function", such as "myhooks:require_token"; got "{value}"'
        )
    return str(value)


def _path_prefix(value: object) -> str:
    if not _string(value).startswith("/"):
        raise ValueError(f'must start with "/", got "{value}"')
    return str(value)


_POSITIVE, _ZERO_OK = _duration(zero_ok=False), _duration(zero_ok=True)
_SERVER_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "workers": _int(1), "header_timeout": _POSITIVE, "keepalive_timeout": _POSITIVE,
    "body_timeout": _POSITIVE, "write_timeout": _POSITIVE, "max_header_bytes": _int(1),
    "max_header_count": _int(1), "max_body_bytes": _int(0), "max_connections": _int(1),
    "max_requests_per_connection": _int(0), "max_concurrent_streams": _int(1),
    "drain_timeout": _ZERO_OK, "request_id": _bool, "request_id_header": _header_name,
    "hook_timeout": _POSITIVE,
})  # fmt: skip
_UPSTREAM_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "balance": _choice("round_robin", "least_conn"), "protocol": _choice("http/1.1", "h2"),
    "max_connections": _int(1),
    "max_idle": _int(0), "idle_timeout": _POSITIVE, "connect_timeout": _POSITIVE,
    "response_header_timeout": _POSITIVE, "read_timeout": _ZERO_OK, "queue_size": _int(0),
    "queue_timeout": _ZERO_OK, "max_requests_per_connection": _int(0), "max_fails": _int(1),
    "fail_window": _POSITIVE, "fail_timeout": _POSITIVE, "next_server_tries": _int(1),
    "tls_server_name": _server_name, "tls_verify": _bool, "host_header": _host_header,
})  # fmt: skip
_UPSTREAM_TLS_FILES = ("tls_ca", "tls_cert", "tls_key")
_HEALTH_CHECK_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "path": _probe_path, "interval": _POSITIVE, "timeout": _POSITIVE,
    "expect_status": _status_ranges, "rise": _int(1), "fall": _int(1),
})  # fmt: skip
_ROUTE_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "upstream": _string, "host": _route_host, "path_prefix": _path_prefix, "strip_prefix": _bool,
    "hook_timeout": _POSITIVE,
})  # fmt: skip
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token


def _header_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected an array of header names, got {_kind(value)}")
    names = []
    for item in value:
        if not isinstance(item, str) or not _HEADER_NAME.fullmatch(item):
            raise ValueError(f'expected header names such as "authorization", got {item!r}')
        names.append(item.lower())
    return tuple(names)


_INSPECT_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "enabled": _bool, "keep": _int(1), "max_body_bytes": _int(0), "mask_headers": _header_names,
})  # fmt: skip
_LOG_FIELDS: Mapping[str, _Conv] = MappingProxyType({
    "access": _string, "format": _choice("json", "combined"),
    "level": _choice("debug", "info", "warning", "error"),
})  # fmt: skip


def _dotted(path: _KeyPath) -> str:
    """``("routes", 0, "upstream")`` -> ``routes[0].upstream``; odd names are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{name}" if out else name
    return out


def _resolve(base_dir: Path, value: str) -> Path:
    return Path(os.path.abspath(os.path.join(base_dir, value)))


def _address(value: object, *, upstream: bool) -> ServerAddress:
    """A listen address (no scheme, port 0 allowed) or an upstream server (port 1..65535)."""
    text = _string(value)
    if not upstream and "://" in text:
        raise ValueError(f'bad address "{text}": a listen address takes no scheme')
    address = parse_address(text)
    if upstream and address.port == 0:
        raise ValueError(f'bad address "{text}": the port must be from 1 to 65535')
    if upstream and not address.host:
        raise ValueError(f'bad address "{text}": "{ANY_HOST}" is for listen addresses only')
    return address


_WILDCARDS = {"": None, "0.0.0.0": "v4", "::": "v6"}  # host -> the family it covers (None: all)


def _family(host: str) -> str:
    return "v6" if ":" in host else "v4"


def listen_overlap(a: ServerAddress, b: ServerAddress) -> bool:
    """Whether binding ``a`` and then ``b`` fails with "address in use": the same port (not
    0, which the kernel picks), and the same host or a wildcard that covers the other.
    Host names are compared as written (resolving them is left to the bind)."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    for wild, other in ((a.host, b.host), (b.host, a.host)):
        if wild in _WILDCARDS:
            covered = _WILDCARDS[wild]
            return covered is None or other == "" or covered == _family(other)
    return False


class _Checker:
    """Collects problems while the dataclasses are built, so one pass reports all of them."""

    def __init__(self, path: str, index: _LineIndex, base_dir: Path) -> None:
        self.path, self.index, self.base_dir = path, index, base_dir
        self.problems: list[ConfigProblem] = []

    def add(self, key: _KeyPath, message: str) -> None:
        line = self.index.line_of(key)
        self.problems.append(ConfigProblem(self.path, line, _dotted(key), message))

    def convert(self, value: object, key: _KeyPath, conv: _Conv) -> Any:
        """``conv(value)``, or None after recording its ValueError as a problem at ``key``."""
        try:
            return conv(value)
        except ValueError as exc:
            self.add(key, str(exc))
            return None

    def table(self, value: object, key: _KeyPath, allowed: Iterable[str]) -> dict[str, Any] | None:
        """The value as a table, after reporting its unknown keys (with a did-you-mean)."""
        if not isinstance(value, dict):
            self.add(key, f"expected a table, got {_kind(value)}")
            return None
        allowed = list(allowed)
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.add(key + (name,), f"unknown key{hint}")
        return value

    def fields(
        self, table: dict[str, Any], key: _KeyPath, schema: Mapping[str, _Conv]
    ) -> dict[str, Any]:
        """Valid values of the keys present; absent ones keep their dataclass default."""
        out = {name: self.convert(table[name], key + (name,), conv)
               for name, conv in schema.items() if name in table}  # fmt: skip
        return {name: value for name, value in out.items() if value is not None}

    def require(self, table: dict[str, Any], key: _KeyPath, *names: str) -> bool:
        missing = [name for name in names if name not in table]
        for name in missing:
            self.add(key + (name,), "missing required key")
        return not missing

    def addresses(
        self, value: object, key: _KeyPath, *, upstream: bool
    ) -> tuple[ServerAddress, ...] | None:
        if not isinstance(value, list):
            self.add(key, f'expected an array of "host:port" strings, got {_kind(value)}')
            return None
        out = [self.convert(item, key + (i,), lambda v: _address(v, upstream=upstream))
               for i, item in enumerate(value)]  # fmt: skip
        return None if None in out else tuple(out)

    def readable_file(self, value: object, key: _KeyPath) -> Path | None:
        def conv(value: object) -> Path:
            path = _resolve(self.base_dir, _string(value))
            try:
                with open(path, "rb"):
                    return path
            except OSError as exc:
                raise ValueError(f'cannot read "{path}": {exc.strerror or exc}') from exc

        result: Path | None = self.convert(value, key, conv)
        return result

    def writable_file(self, path: str, key: _KeyPath) -> None:
        """A file the proxy will append to: it exists and is writable, or its folder does and
        is; checked now because opening it happens only when ``run`` starts."""
        why = _not_writable(path)
        if why is not None:
            self.add(key, why)


def _not_writable(path: str) -> str | None:
    if os.path.isdir(path):
        return f'"{path}" is a directory'
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else f'cannot write to "{path}": permission denied'
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f'cannot create "{path}": folder "{folder}" does not exist'
    if not os.access(folder, os.W_OK | os.X_OK):
        return f'cannot create "{path}": folder "{folder}" is not writable'
    return None


def _server(c: _Checker, raw: object) -> ServerConfig:
    key: _KeyPath = ("server",)
    table = c.table(raw, key, [*_SERVER_FIELDS, "listen", "tls"])
    if table is None:
        return ServerConfig()
    kw = c.fields(table, key, _SERVER_FIELDS)
    if "tls" in table:
        kw["tls"] = _tls(c, table["tls"])
    if "listen" in table:
        listen = c.addresses(table["listen"], key + ("listen",), upstream=False)
        if listen == () and "tls" not in table:
            c.add(key + ("listen",), "is empty: set [server.tls] to serve TLS only")
        elif listen is not None:
            kw["listen"] = listen
    return ServerConfig(**kw)


def _tls(c: _Checker, raw: object) -> TlsConfig | None:
    key: _KeyPath = ("server", "tls")
    table = c.table(raw, key, ("listen", "cert", "key"))
    if table is None or not c.require(table, key, "listen", "cert", "key"):
        return None
    listen = c.addresses(table["listen"], key + ("listen",), upstream=False)
    if listen == ():
        c.add(key + ("listen",), "must list at least one address")
    cert = c.readable_file(table["cert"], key + ("cert",))
    tls_key = c.readable_file(table["key"], key + ("key",))
    if not listen or cert is None or tls_key is None:
        return None
    return TlsConfig(listen=listen, cert=cert, key=tls_key)


def _admin(c: _Checker, raw: object) -> AdminConfig | None:
    key: _KeyPath = ("admin",)
    table = c.table(raw, key, ("listen", "ready_requires_healthy_upstreams"))
    if table is None or not c.require(table, key, "listen"):
        return None
    listen = c.convert(table["listen"], key + ("listen",), lambda v: _address(v, upstream=False))
    kw = c.fields(table, key, {"ready_requires_healthy_upstreams": _bool})
    return None if listen is None else AdminConfig(listen=listen, **kw)


def _log(c: _Checker, raw: object) -> LogConfig:
    table = c.table(raw, ("log",), _LOG_FIELDS)
    kw = {} if table is None else c.fields(table, ("log",), _LOG_FIELDS)
    if kw.get("access", "stdout") not in ("stdout", "off"):
        kw["access"] = str(_resolve(c.base_dir, kw["access"]))
        c.writable_file(kw["access"], ("log", "access"))
    return LogConfig(**kw)


def _inspect(
    c: _Checker, raw: object, server: ServerConfig, admin: AdminConfig | None
) -> InspectConfig:
    key: _KeyPath = ("inspect",)
    table = c.table(raw, key, _INSPECT_FIELDS)
    if table is None:
        return InspectConfig()
    inspect = InspectConfig(**c.fields(table, key, _INSPECT_FIELDS))
    if inspect.enabled and admin is None:
        c.add(key + ("enabled",), "needs [admin] listen: the inspector is served there")
    elif inspect.enabled and server.workers > 1:
        # Each worker would record only the exchanges it serves, while the admin listener is
        # the supervisor's: one list could not show them all.
        c.add(key + ("enabled",), f"needs server.workers = 1 (got {server.workers})")
    return inspect


def _check_listen_overlap(c: _Checker, server: ServerConfig, admin: AdminConfig | None) -> None:
    """Two listeners on one address: the second bind would fail once ``run`` starts. Skipped
    when a listen address was already reported (its default would stand in for it)."""
    if any(p.key.startswith(("server.listen", "server.tls", "admin")) for p in c.problems):
        return
    listeners: list[tuple[_KeyPath, ServerAddress]] = [
        (("server", "listen", i), address) for i, address in enumerate(server.listen)
    ]
    if server.tls is not None:
        listeners += [(("server", "tls", "listen", i), a) for i, a in enumerate(server.tls.listen)]
    if admin is not None:
        listeners.append((("admin", "listen"), admin.listen))
    for i, (key, address) in enumerate(listeners):
        for earlier_key, earlier in listeners[:i]:
            if listen_overlap(earlier, address):
                taken = f'is already taken by {_dotted(earlier_key)} ("{earlier}")'
                c.add(key, f'"{address}" {taken}')
                break


def _upstreams(c: _Checker, raw: dict[str, Any]) -> dict[str, UpstreamConfig]:
    out: dict[str, UpstreamConfig] = {}
    for name, body in raw.items():
        key: _KeyPath = ("upstreams", name)
        table = c.table(
            body, key, [*_UPSTREAM_FIELDS, *_UPSTREAM_TLS_FILES, "servers", "health_check"]
        )
        if table is None or not c.require(table, key, "servers"):
            continue
        kw = c.fields(table, key, _UPSTREAM_FIELDS)
        for file_key in _UPSTREAM_TLS_FILES:
            if file_key in table:
                kw[file_key] = c.readable_file(table[file_key], key + (file_key,))
        if "health_check" in table:
            kw["health_check"] = _health_check(c, table["health_check"], key + ("health_check",))
        servers = c.addresses(table["servers"], key + ("servers",), upstream=True)
        if servers == ():
            c.add(key + ("servers",), "must list at least one server")
        elif servers is not None:
            _upstream_tls(c, table, key, servers)
            servers = _upstream_protocol(c, table, key, servers, kw)
            out[name] = UpstreamConfig(name=name, servers=servers, **kw)
    return out


def _upstream_protocol(
    c: _Checker,
    table: dict[str, Any],
    key: _KeyPath,
    servers: tuple[ServerAddress, ...],
    kw: dict[str, Any],
) -> tuple[ServerAddress, ...]:
    """The servers of one upstream speak one protocol: ``protocol = "h2"`` makes every one
    an HTTP/2 server (TLS with ALPN h2 for https://, prior knowledge for http://); without
    it, ``h2c://`` servers are HTTP/2 and may not be mixed with HTTP/1.1 ones."""
    h2c = [i for i, server in enumerate(servers) if server.h2]
    protocol = table.get("protocol")
    if protocol == "h2":
        return tuple(replace(server, h2=True) for server in servers)
    if h2c and protocol == "http/1.1":
        c.add(key + ("protocol",), 'is "http/1.1", but h2c:// servers speak HTTP/2')
    elif h2c and len(h2c) < len(servers):
        first_h1 = next(i for i in range(len(servers)) if i not in h2c)
        c.add(
            key + ("servers", first_h1),
            "is HTTP/1.1 among h2c:// servers: one upstream speaks one protocol (set protocol = "
            '"h2" to speak HTTP/2 to http:// and https:// servers too)',
        )
    elif h2c:
        kw["protocol"] = "h2"
    return servers


def _upstream_tls(
    c: _Checker, table: dict[str, Any], key: _KeyPath, servers: tuple[ServerAddress, ...]
) -> None:
    """The TLS keys of one upstream make sense together and with its servers."""
    tls_keys = [name for name in ("tls_ca", "tls_server_name", "tls_verify", "tls_cert", "tls_key")
                if name in table]  # fmt: skip
    if not any(server.tls for server in servers):
        for name in tls_keys:
            c.add(key + (name,), "has no effect: no server of this upstream is https://")
        return
    if "tls_cert" in table and "tls_key" not in table:
        c.add(key + ("tls_cert",), "needs tls_key (the client certificate's private key)")
    if "tls_key" in table and "tls_cert" not in table:
        c.add(key + ("tls_key",), "needs tls_cert (the client certificate it belongs to)")
    if "tls_ca" in table and table.get("tls_verify") is False:
        c.add(key + ("tls_ca",), "has no effect with tls_verify = false")


def _health_check(c: _Checker, raw: object, key: _KeyPath) -> HealthCheckConfig | None:
    table = c.table(raw, key, _HEALTH_CHECK_FIELDS)
    if table is None:
        return None
    kw = c.fields(table, key, _HEALTH_CHECK_FIELDS)
    config = HealthCheckConfig(**kw)
    if config.timeout > config.interval:
        c.add(key + ("timeout",), f"must not be longer than interval ({config.interval:g}s)")
        return None
    return config


def _routes(c: _Checker, raw: object, names: Iterable[str]) -> list[RouteConfig]:
    if not isinstance(raw, list):
        c.add(("routes",), f"expected an array of tables ([[routes]]), got {_kind(raw)}")
        return []
    names, out = list(names), []
    for i, body in enumerate(raw):
        key: _KeyPath = ("routes", i)
        table = c.table(body, key, [*_ROUTE_FIELDS, "hooks"])
        if table is None or not c.require(table, key, "upstream"):
            continue
        kw = c.fields(table, key, _ROUTE_FIELDS)
        if "hooks" in table:
            kw["hooks"] = _route_hooks(c, table["hooks"], key)
        if "hook_timeout" in table and not table.get("hooks"):
            c.add(key + ("hook_timeout",), "has no effect: this route has no hooks")
        upstream = kw.get("upstream")
        if isinstance(upstream, str) and upstream not in names:
            close = difflib.get_close_matches(upstream, names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            c.add(key + ("upstream",), f'unknown upstream "{upstream}"{hint}')
        elif upstream is not None:
            out.append(RouteConfig(**kw))
    return out


def _route_hooks(c: _Checker, raw: object, key: _KeyPath) -> tuple[str, ...]:
    """A route's ``hooks``, each checked on the line it is written on. (Importing them is
    route_hooks.py's job: this module runs no code of the user's.)"""
    if not isinstance(raw, list):
        c.add(key + ("hooks",), f'expected an array of "module:function" strings, got {_kind(raw)}')
        return ()
    specs = [c.convert(item, key + ("hooks", i), _hook_spec) for i, item in enumerate(raw)]
    return tuple(spec for spec in specs if spec is not None)


def _build(c: _Checker, data: dict[str, Any], source: Path | None) -> Config | None:
    c.table(data, (), ("server", "admin", "log", "inspect", "upstreams", "routes"))
    server = _server(c, data["server"]) if "server" in data else ServerConfig()
    admin = _admin(c, data["admin"]) if "admin" in data else None
    log = _log(c, data["log"]) if "log" in data else LogConfig()
    inspect = _inspect(c, data["inspect"], server, admin) if "inspect" in data else InspectConfig()
    _check_listen_overlap(c, server, admin)
    raw_upstreams = c.table(data.get("upstreams", {}), ("upstreams",), data.get("upstreams", {}))
    names = list(raw_upstreams or {})
    upstreams = _upstreams(c, raw_upstreams or {})
    if raw_upstreams == {}:
        c.add(("upstreams",), "no upstreams defined: add an [upstreams.NAME] table")
    routes = _routes(c, data["routes"], names) if "routes" in data else []
    if data.get("routes", []) == []:
        if len(names) == 1:  # a single upstream serves everything without a [[routes]] table
            routes = [RouteConfig(upstream=names[0])]
        elif len(names) > 1:
            c.add(("routes",), "no routes: with several upstreams, add [[routes]] tables")
    if c.problems:
        return None
    return Config(server=server, admin=admin, log=log, inspect=inspect,
                  upstreams=MappingProxyType(upstreams), routes=tuple(routes),
                  path=source)  # fmt: skip


# -------------------------------------------------------------------------------- entry points

_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _syntax_problem(path: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(exc)
    match = _AT_LINE.search(message)
    if match:
        message = f"{message[: match.start()]} (column {match[2]})"
        return ConfigProblem(path, int(match[1]), "(syntax)", message)
    message = message.replace("(at end of document)", "(at end of file)")
    return ConfigProblem(path, max(1, len(text.splitlines())), "(syntax)", message)


def parse_config(text: str, path: str = "<config>", *, base_dir: Path | None = None) -> Config:
    """Parse TOML text; ``path`` names it in messages and relative paths resolve against
    ``base_dir`` (default: the folder of ``path``). Raises ConfigError with every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_problem(path, text, exc)]) from exc
    base_dir = base_dir if base_dir is not None else Path(path).parent
    checker = _Checker(path, _LineIndex(text), base_dir)
    config = _build(checker, data, None if path.startswith("<") else Path(path))
    if config is None:
        raise ConfigError(sorted(checker.problems, key=lambda problem: problem.line))
    return config


def key_line(path: str | os.PathLike[str], key: tuple[str | int, ...]) -> int:
    """The line of the config file at ``path`` where ``key`` was written (1 if unknown), for
    problems found after loading, such as a TLS certificate that does not load."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return 1
    return _LineIndex(text).line_of(key)


def problem_after_load(config: Config, key: tuple[str | int, ...], message: str) -> ConfigProblem:
    """A problem with ``config`` found after it was parsed (a TLS file that does not load),
    located like the parser's own: the file, the line of ``key``, the dotted key."""
    if config.path is None:
        return ConfigProblem("<config>", 1, _dotted(key), message)
    return ConfigProblem(str(config.path), key_line(config.path, key), _dotted(key), message)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file; an unreadable file is a ConfigError on key ``(file)``."""
    shown = os.fspath(path)
    try:
        text = Path(shown).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        problem = ConfigProblem(shown, 1, "(file)", f"cannot read: {exc.strerror or exc}")
        raise ConfigError([problem]) from exc
    except UnicodeDecodeError as exc:
        why = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        problem = ConfigProblem(shown, 1, "(file)", why)
        raise ConfigError([problem]) from exc
    return parse_config(text, shown, base_dir=Path(shown).parent)


def dev_upstream(text: str) -> ServerAddress:
    """An upstream as ``pooled-proxy dev`` takes it: ``http://host:port``, ``https://host``,
    ``host:port``, or Caddy's shorthand for a local port, ``:3000`` or ``3000``. A local port
    means ``localhost``, which is tried over IPv6 and IPv4: dev servers that listen on
    ``localhost`` often bind ``::1`` only."""
    port = text.removeprefix(":")
    if port.isascii() and port.isdigit():
        text = f"localhost:{port}"
    return _address(text, upstream=True)


def dev_listen(text: str) -> ServerAddress:
    """A ``dev --listen`` address: ``host:port``, or ``8080`` / ``:8080`` for 127.0.0.1:8080
    (loopback: a dev proxy is not for the network unless asked, e.g. ``0.0.0.0:8080``)."""
    port = text.removeprefix(":")
    if port.isascii() and port.isdigit():
        text = f"127.0.0.1:{port}"
    return _address(text, upstream=False)


def _authority(address: ServerAddress) -> str:
    """``host[:port]`` as a Host header names ``address`` (the scheme's port left out)."""
    default = 443 if address.tls else 80
    return address.host if address.port == default else str(address)


def _dev_name(prefix: str, taken: Iterable[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", prefix.strip("/")) or "app"
    taken, candidate, n = set(taken), name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}{n}"
    return candidate


def dev_config(
    upstream_url: str | None,
    listen: str = "127.0.0.1:8080",
    *,
    routes: Iterable[tuple[str, str]] = (),
    change_host_header: bool = False,
    access: str = "stdout",
    admin: str | None = None,
    inspect: bool = False,
) -> Config:
    """A ready config for ``pooled-proxy dev``, with config/dev.toml's settings: the upstream
    ``upstream_url`` (named "app") for every path, and each ``(path_prefix, url)`` of
    ``routes`` in front of it (longest prefix first; the prefix is kept in the path); combined
    logs for humans to ``access``. ``change_host_header`` sends each upstream its own name as
    Host instead of the client's (a remote or virtual-hosted app). ``admin``: where the admin
    listener listens (``dev_listen`` form), with the request inspector if ``inspect``.
    Raises ValueError on a bad URL, address or prefix."""
    pairs = [(_path_prefix(prefix), url) for prefix, url in routes]
    if upstream_url is not None:
        pairs.append(("/", upstream_url))
    if not pairs:
        raise ValueError("no upstream: give a URL or at least one --route PREFIX=URL")
    upstreams: dict[str, UpstreamConfig] = {}
    route_list: list[RouteConfig] = []
    for prefix, url in sorted(pairs, key=lambda pair: -len(pair[0])):
        if any(route.path_prefix == prefix for route in route_list):
            raise ValueError(f'the path prefix "{prefix}" is given twice')
        server = dev_upstream(url)
        name = _dev_name(prefix, upstreams)
        upstreams[name] = UpstreamConfig(
            name=name,
            servers=(server,),
            protocol="h2" if server.h2 else "http/1.1",
            max_connections=16,
            max_idle=4,
            idle_timeout=30.0,
            connect_timeout=1.0,
            response_header_timeout=300.0,
            read_timeout=0.0,
            queue_timeout=30.0,
            host_header=_authority(server) if change_host_header else None,
        )
        route_list.append(RouteConfig(upstream=name, path_prefix=prefix))
    if access not in ("stdout", "off"):
        access = os.path.abspath(access)
        why = _not_writable(access)
        if why is not None:
            raise ValueError(f"--access-log: {why}")
    if inspect and admin is None:
        raise ValueError("the inspector needs an admin listener (--admin ADDRESS)")
    listen_address = dev_listen(listen)
    admin_config = None
    if admin is not None:
        admin_config = AdminConfig(listen=dev_listen(admin))
        if listen_overlap(listen_address, admin_config.listen):
            raise ValueError(f'--admin "{admin}" is the address the proxy listens on')
    return Config(
        server=ServerConfig(listen=(listen_address,), header_timeout=30.0, drain_timeout=2.0),
        admin=admin_config,
        log=LogConfig(access=access, format="combined"),
        inspect=InspectConfig(enabled=inspect),
        upstreams=MappingProxyType(upstreams),
        routes=tuple(route_list),
    )
