"""The proxy's own answers: short text/plain bodies with an RFC 9209 Proxy-Status header."""

from __future__ import annotations

import math
from http import HTTPStatus

from .errors import PoolTimeout, ProxyError
from .headers import Headers, http_date

PROXY_NAME = b"pooled-proxy"


def _sf_string(text: str) -> bytes:
    """An RFC 8941 sf-string: printable ASCII, with quotes and backslashes escaped."""
    cleaned = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return b'"' + cleaned.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def error_response(exc: ProxyError, *, retry_after: float = 1.0) -> tuple[int, Headers, bytes]:
    """Status, headers and body for answering ``exc`` to a client."""
    status = exc.status
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = f"{status} {phrase}: {exc.reason}\n".encode()
    proxy_status = PROXY_NAME + b"; error=" + exc.proxy_status.encode("ascii")
    if exc.client_detail and exc.client_detail != exc.reason:
        proxy_status += b"; details=" + _sf_string(exc.client_detail)
    headers: Headers = [
        (b"date", http_date()),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"proxy-status", proxy_status),
    ]
    if isinstance(exc, PoolTimeout) or status == 503:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    return status, headers, body
