"""The HTTP/1.1 serializer's direct path: messages written byte for byte as h11 writes them.

Parsing and serializing with h11 was most of the proxy's own work per request, yet most
messages are the same simple thing. The connection objects (connection.py) write those here,
and everything else with h11; the tests check against h11 that both write the same bytes.

Sans-IO: headers in, bytes out.
"""

from __future__ import annotations

from http import HTTPStatus

from ...headers import Headers, comma_tokens
from ._abnf import (
    HEAD_BYTES,
    STATEFUL_FIELD,
    STATEFUL_FIELD_BUT_LENGTH,
    TOKEN_FULL,
    TOKENS,
    VISIBLE_ASCII,
)

__all__ = [
    "REASONS",
    "Unwritable",
    "chunk",
    "close_connection",
    "declared_length",
    "direct_request",
    "raw_response",
    "request_head",
    "response_head",
]

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
LAST_CHUNK = b"0\r\n\r\n"


class Unwritable(Exception):
    """We were asked to write something HTTP/1.1 (or the message's state) does not allow.
    Never the peer's fault."""


def response_head(status: int, headers: Headers, extra: bytes = b"") -> bytes:
    """A response head as h11 writes it; ``extra`` is header lines to end it with."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
    for name, value in headers:
        lines.append(b"%b: %b\r\n" % (name, value))
    lines.append(extra)
    lines.append(b"\r\n")
    return b"".join(lines)


def raw_response(status: int, headers: Headers, body: bytes) -> bytes:
    """A whole response as it is, for answers with no request to answer (a bad or missing
    request head, a connection refused before HTTP)."""
    return response_head(status, headers) + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (nothing for no data: an empty chunk would end it)."""
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def declared_length(headers: Headers) -> int | None:
    """The Content-Length a message's headers declare, if any."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def close_connection(headers: Headers) -> tuple[Headers, bytes]:
    """``headers`` without Connection, and the Connection value that closes (as h11 builds it)."""
    tokens = {b"close"}
    kept: Headers = []
    for field in headers:
        if field[0] == b"connection":
            tokens.update(comma_tokens(field[1]))
        else:
            kept.append(field)
    tokens.discard(b"keep-alive")
    return kept, b", ".join(sorted(tokens))


def request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """A request head as h11 writes it, names as given (``headers`` starts with Host)."""
    fields = b"\r\n".join(map(b": ".join, headers))
    return b"%s %s HTTP/1.1\r\n%s\r\n\r\n" % (method, target, fields)


def direct_request(
    method: bytes, target: bytes, headers: Headers, body: bytes = b"", *, valid_syntax: bool = False
) -> bytes | None:
    """The bytes h11 would send for this request, bodiless or with its whole ``body``, when
    it is one written directly: Host first, nothing that changes the connection's state or
    the body's framing, every byte one h11 writes as it is. ``None``: h11 writes it (and
    refuses what is invalid).

    ``valid_syntax``: the method, the target and every field are known to be in the HTTP
    grammar (the request validation passed them), so only what changes the framing or the
    connection's state is looked at.
    """
    if not headers or headers[0][0] != b"host" or method == b"CONNECT":
        return None
    if body:
        # Framed by the one Content-Length it carries, which must say what the body is.
        if [value for name, value in headers if name == b"content-length"] != [b"%d" % len(body)]:
            return None
        stateful = STATEFUL_FIELD_BUT_LENGTH
    else:
        stateful = STATEFUL_FIELD
    try:
        data = request_head(method, target, headers)
    except TypeError:  # not all bytes: h11 converts or refuses them
        return None
    request_line_length = len(method) + len(target) + 12  # "M T HTTP/1.1\r\n"
    if not valid_syntax and not _valid_syntax(data, method, target, headers):
        return None
    # Host is first; nothing after it may be one of these
    if stateful.search(data, request_line_length + 6 + len(headers[0][1])) is not None:
        return None
    return data + body if body else data


def _valid_syntax(data: bytes, method: bytes, target: bytes, headers: Headers) -> bool:
    """``data`` (the head written from the rest) holds only what h11 writes as it is."""
    lines = len(headers) + 2
    return not (
        data.translate(None, HEAD_BYTES)  # a control byte
        or not TOKEN_FULL.fullmatch(method)
        or not target
        or target.translate(None, VISIBLE_ASCII)
        # names are tokens, so each ends at its line's first ": "
        or not TOKENS.fullmatch(b"".join([name for name, _ in headers]))
        # a CR or LF inside a value would have made two lines of one, or a broken one
        or data.count(b"\n") != lines
        or data.count(b"\r") != lines
        # whitespace at either end of a value, or an empty name (substrings, each searched
        # in C; a value with whitespace after an inner ": " is declined too)
        or b":  " in data
        or b": \t" in data
        or b" \r\n" in data
        or b"\t\r\n" in data
        or b"\n: " in data
    )
