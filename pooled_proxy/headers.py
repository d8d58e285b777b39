"""Header rewriting: hop-by-hop stripping, X-Forwarded-*, Via, Date, and h2 <-> h1 translation.

Headers are ``list[tuple[bytes, bytes]]`` with lower-case names at every boundary. Each
function makes one pass over the list, because this runs for every request. All are pure but
:data:`http_date`, which reads the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from .request_ids import choose_request_id

Headers = list[tuple[bytes, bytes]]

# RFC 9110 section 7.6.1, plus the de-facto ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers we set ourselves on the way up; whatever the client sent for them is replaced
# (X-Forwarded-For and Via are appended to instead, see below).
_SET_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"host"})
VIA_TOKEN = b"pooled-proxy"


def first_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of the first field called ``name`` (lower-case), or None."""
    for field_name, value in headers:
        if field_name == name:
            return value
    return None


def comma_tokens(value: bytes) -> list[bytes]:
    """The items of a comma-separated header value, lower-case, without the empty ones."""
    return [token for token in (t.strip().lower() for t in value.split(b",")) if token]


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names listed in ``Connection`` headers: those headers are hop-by-hop too (and
    ``close`` among them ends the connection)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(comma_tokens(value))
    return frozenset(tokens)


def _drop_set(headers: Headers) -> frozenset[bytes]:
    named = connection_tokens(headers)
    return HOP_BY_HOP | named if named else HOP_BY_HOP


def upstream_request_headers(
    headers: Headers,
    *,
    host: bytes,
    client_ip: bytes,
    scheme: bytes,
    protocol: bytes,
    upstream_host: bytes | None = None,
    request_id_header: bytes = b"",
) -> Headers:
    """The headers to send upstream for a client request.

    ``protocol`` is the client's HTTP version as it goes into ``Via`` (``b"1.1"`` or ``b"2"``).
    ``upstream_host`` (an upstream's ``host_header``) replaces the client's Host, which
    still goes up as ``X-Forwarded-Host``.
    With a ``request_id_header`` (a lower-case name), the client's fields of that name are
    replaced by one carrying the request's ID, the client's first one if it is sane, else a
    new one (:func:`~pooled_proxy.request_ids.choose_request_id`): the last field returned.
    """
    drop = _drop_set(headers)
    out: Headers = [(b"host", upstream_host or host)]
    forwarded_for = b""
    via = b""
    client_id: bytes | None = None
    for name, value in headers:
        if name in drop or name in _SET_BY_PROXY:
            continue
        if name == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
        elif name == b"via":
            via = via + b", " + value if via else value
        elif name == request_id_header:
            if client_id is None:
                client_id = value
        else:
            out.append((name, value))
    out.append(
        (b"x-forwarded-for", forwarded_for + b", " + client_ip if forwarded_for else client_ip)
    )
    out.append((b"x-forwarded-proto", scheme))
    out.append((b"x-forwarded-host", host))
    hop = protocol + b" " + VIA_TOKEN
    out.append((b"via", via + b", " + hop if via else hop))
    if request_id_header:
        out.append((request_id_header, choose_request_id(client_id)))
    return out


_DAY_NAMES = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTH_NAMES = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
)  # fmt: skip


def format_http_date(second: int) -> bytes:
    """A Unix time as an HTTP ``Date`` value (RFC 9110 5.6.7 IMF-fixdate). Not with
    email.utils, which loads the socket module into what protocol/ imports (sans-IO)."""
    t = time.gmtime(second)
    return b"%s, %02d %s %d %02d:%02d:%02d GMT" % (
        _DAY_NAMES[t.tm_wday],
        t.tm_mday,
        _MONTH_NAMES[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


class _HttpDate:
    """The current time as a ``Date`` value, formatted once per second: it goes on responses."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._value = format_http_date(second)
            self._second = second
        return self._value


http_date = _HttpDate()


def client_response_headers(
    headers: Headers,
    *,
    protocol: bytes,
    date: Callable[[], bytes] | None = None,
    request_id: tuple[bytes, bytes] | None = None,
) -> Headers:
    """The headers to send the client for an upstream response; ``protocol`` is the upstream's.

    ``date``: a final response without ``Date`` gets one from it (RFC 9110 6.6.1: a recipient
    with a clock must add it).
    ``request_id`` (name, ID) replaces whatever the upstream sent under that name: the
    client gets the ID the proxy logged and sent upstream.
    """
    drop = _drop_set(headers)
    out: Headers = []
    via = b""
    dated = False
    id_name = request_id[0] if request_id is not None else b""
    for name, value in headers:
        if name in drop or name == id_name:
            continue
        if name == b"via":
            via = via + b", " + value if via else value
        else:
            if name == b"date":
                dated = True
            out.append((name, value))
    if date is not None and not dated:
        out.append((b"date", date()))
    hop = protocol + b" " + VIA_TOKEN
    out.append((b"via", via + b", " + hop if via else hop))
    if request_id is not None:
        out.append(request_id)
    return out


# Fields a trailer section must not carry (framing, routing; RFC 9110 section 6.5.1), on top
# of the hop-by-hop ones.
_NOT_IN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host"}


def trailer_fields(trailers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """An upstream's trailers as they may be relayed to a client: lower-case names, without
    pseudo-fields, hop-by-hop and framing fields."""
    out: Headers = []
    for name, value in trailers:
        name = name.lower()
        if name not in _NOT_IN_TRAILERS and not name.startswith(b":"):
            out.append((name, value))
    return out


def keep_alive_timeout(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The ``timeout=N`` an upstream advertises in ``Keep-Alive``, if any."""
    for name, value in headers:
        if name != b"keep-alive":
            continue
        for param in value.split(b","):
            key, _, number = param.strip().partition(b"=")
            if key.strip().lower() == b"timeout":
                try:
                    seconds = float(number.strip())
                except ValueError:
                    return None
                return seconds if seconds >= 0 else None
    return None


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


def h2_request_to_h1(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[dict[bytes, bytes], Headers]:
    """Split an HTTP/2 header block into pseudo-headers and ordinary headers.

    Cookie crumbs (RFC 9113 section 8.2.3) are joined with ``; `` into one header, as an
    HTTP/1.1 upstream expects.
    """
    pseudo: dict[bytes, bytes] = {}
    out: Headers = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            out.append((name, value))
    if cookies:
        out.append((b"cookie", b"; ".join(cookies)))
    return pseudo, out


def h1_response_to_h2(status: int, headers: Headers) -> Headers:
    """An HTTP/2 response header block: ``:status`` first, names lower-case, no h1-only ones."""
    out: Headers = [(b":status", str(status).encode())]
    for name, value in headers:
        name = name.lower()
        if name in HOP_BY_HOP or name == b"host":
            continue
        out.append((name, value))
    return out
