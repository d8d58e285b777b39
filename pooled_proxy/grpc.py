"""gRPC through the proxy: a call's deadline from ``grpc-timeout``, and the proxy's own errors
answered as gRPC statuses.

A gRPC client reads a call's outcome from ``grpc-status`` (in trailers, or in the headers of
a "trailers-only" response), not from the HTTP status: a text 502 reaches it as an
unexplained failure. So when the proxy itself fails a gRPC call (no upstream, a timeout, a
full queue), it answers HTTP 200 with ``content-type: application/grpc`` and the status in
the header block that ends the stream. Pure: no trio.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import (
    ClientError,
    ConnectTimeout,
    DeadlineExceeded,
    NoRoute,
    ProxyError,
    ProxyInternalError,
    UpstreamStreamReset,
    UpstreamTimeout,
)
from .headers import Headers

CONTENT_TYPE = b"application/grpc"
# Status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# grpc-timeout units, in seconds (the gRPC over HTTP/2 spec: 1 to 8 digits, then the unit).
_MAX_TIMEOUT_VALUE = 99_999_999
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# The gRPC spec's mapping of HTTP statuses, for the client errors the proxy answers.
_FROM_HTTP = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED, 404: UNIMPLEMENTED}
# The gRPC spec's mapping of the RST_STREAM codes the proxy relays (errors.py: CANCEL,
# ENHANCE_YOUR_CALM); every other code is INTERNAL (REFUSED_STREAM was replayed).
_FROM_RESET = {0x8: CANCELLED, 0xB: RESOURCE_EXHAUSTED}


def is_grpc(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A gRPC request: ``content-type`` is ``application/grpc`` or ``application/grpc+...``."""
    for name, value in headers:
        if name == b"content-type":
            return value == CONTENT_TYPE or value.startswith(
                (b"application/grpc+", b"application/grpc;")
            )
    return False


def grpc_timeout(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The call's timeout in seconds from ``grpc-timeout``; ``None`` without one, or with one
    that is not well-formed (then the call has no deadline here, as before)."""
    for name, value in headers:
        if name == b"grpc-timeout":
            digits, unit = value[:-1], value[-1:]
            if 1 <= len(digits) <= 8 and digits.isdigit() and unit in _UNITS:
                return int(digits) * _UNITS[unit]
            return None
    return None


def grpc_timeout_value(seconds: float) -> bytes:
    """``seconds`` as a ``grpc-timeout`` value: whole milliseconds, rounded up (a call with
    under a millisecond left must not read as one already over), or a coarser unit when the
    milliseconds need more than the 8 digits allowed."""
    # (Less a nanosecond: 0.2 - 0.05 is 0.15000000000000002, not 151 ms.)
    millis = max(1, math.ceil(seconds * 1000 - 1e-6))
    for unit, per in ((b"m", 1), (b"S", 1000), (b"M", 60_000), (b"H", 3_600_000)):
        value = -(-millis // per)
        if value <= _MAX_TIMEOUT_VALUE:
            return b"%d%s" % (value, unit)
    return b"%dH" % _MAX_TIMEOUT_VALUE


def grpc_status(exc: ProxyError) -> int:
    """The gRPC status of a call the proxy failed with ``exc``."""
    if isinstance(exc, ConnectTimeout):
        return UNAVAILABLE  # nothing was sent: the client may try again
    if isinstance(exc, (UpstreamTimeout, DeadlineExceeded)):
        return DEADLINE_EXCEEDED
    if isinstance(exc, UpstreamStreamReset):
        # What the client would have read from the reset itself, had it been relayed.
        return _FROM_RESET.get(exc.error_code, INTERNAL)
    if isinstance(exc, NoRoute):
        return UNIMPLEMENTED
    if isinstance(exc, ProxyInternalError):
        return INTERNAL
    if isinstance(exc, ClientError):
        if exc.status == 413:
            return RESOURCE_EXHAUSTED
        return _FROM_HTTP.get(exc.status, UNKNOWN)
    # The upstream failed or is unreachable, the queue is full, the proxy is draining.
    return UNAVAILABLE


def _percent_encoded(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII but ``%`` as it is, the rest %XX (UTF-8)."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def grpc_error_headers(exc: ProxyError, headers: Headers) -> Headers:
    """A trailers-only gRPC answer to a call failed with ``exc``: the header block of an
    HTTP 200 that ends the stream. ``headers`` are the text answer's (Date, Proxy-Status,
    Retry-After are kept; its content type and length are not)."""
    out: Headers = [(b"content-type", CONTENT_TYPE)]
    out += [
        (name, value) for name, value in headers if name not in (b"content-type", b"content-length")
    ]
    out.append((b"grpc-status", b"%d" % grpc_status(exc)))
    out.append((b"grpc-message", _percent_encoded(f"pooled-proxy: {exc.reason}")))
    return out
