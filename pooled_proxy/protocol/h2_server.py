"""The sans-IO half of the HTTP/2 front end: request heads from h2 header blocks, abuse limits.

The h2 library parses frames and keeps stream state; what it does not do is decide when a
client is abusing the connection. :class:`FrameGuard` reads the same bytes h2 reads, frame
header by frame header (payloads are skipped, not copied), and counts what is cheap for a
client to send but costly for us: RST_STREAM right after HEADERS (rapid reset,
CVE-2023-44487), SETTINGS and PING frames (each makes us write an ACK), empty and PRIORITY
frames, and long HEADERS/CONTINUATION blocks (the 2024 CONTINUATION flood: h2 buffers a
header block until END_HEADERS). Over a limit it raises :class:`H2Abuse`; the shell answers
GOAWAY(ENHANCE_YOUR_CALM) and closes. Time comes in as ``now``, so this is testable without
a clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h2.events
import h2.exceptions
import h2.utilities
from hpack import Encoder, NeverIndexedHeaderTuple

from ..errors import ClientError
from ..exchange import RequestHead
from ..headers import Headers, h2_request_to_h1
from .request_checks import check_request

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6) and the flags we look at.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING = 0, 1, 2, 3, 4, 5, 6
CONTINUATION = 9
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FRAME_HEADER_SIZE = 9


class H2Abuse(Exception):
    """The client broke one of the connection's abuse limits; ``str()`` says which."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AbuseLimits:
    """How much of each cheap-to-send frame a client may send per ``window`` seconds."""

    window: float = 10.0
    resets: int = 200  # RST_STREAM from the client plus streams we refused
    settings: int = 100
    pings: int = 100
    empty_frames: int = 1000  # PRIORITY, and DATA/HEADERS/CONTINUATION with no payload and no end
    continuation_frames: int = 32  # per header block
    header_block_bytes: int = 65536  # encoded size of one HEADERS + CONTINUATION block

    @classmethod
    def for_server(cls, *, max_concurrent_streams: int, max_header_bytes: int) -> AbuseLimits:
        # A client that resets every stream it may open, twice over, within one window is
        # churning, not browsing; the limit grows with the concurrency we allow.
        return cls(
            resets=max(200, 2 * max_concurrent_streams),
            header_block_bytes=max(16384, max_header_bytes),
        )


class _WindowCounter:
    """Events per fixed time window."""

    __slots__ = ("count", "limit", "start", "window")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.start = -float("inf")
        self.count = 0

    def add(self, now: float, what: str) -> None:
        if now - self.start >= self.window:
            self.start, self.count = now, 0
        self.count += 1
        if self.count > self.limit:
            raise H2Abuse(f"more than {self.limit} {what} within {self.window:g}s")


class FrameGuard:
    """Watches the client's frames as they arrive; raises :class:`H2Abuse` over a limit."""

    def __init__(self, limits: AbuseLimits | None = None) -> None:
        self.limits = limits = limits or AbuseLimits()
        self._preface_left = len(PREFACE)
        self._header = bytearray()  # a frame header split across reads
        self._skip = 0  # payload bytes of the current frame still to come
        self._resets = _WindowCounter(limits.resets, limits.window)
        self._settings = _WindowCounter(limits.settings, limits.window)
        self._pings = _WindowCounter(limits.pings, limits.window)
        self._empty = _WindowCounter(limits.empty_frames, limits.window)
        self._block_bytes = 0
        self._block_frames = 0
        #: When the header block now being received began (``None``: none open); the shell
        #: holds it to ``header_timeout``.
        self.header_block_since: float | None = None

    def note_refused(self, now: float) -> None:
        """A stream we refused (over the concurrency limit, or draining) counts as a reset."""
        self._resets.add(now, "reset or refused streams")

    def feed(self, data: bytes, now: float) -> None:
        position = 0
        if self._preface_left:
            position = min(self._preface_left, len(data))
            self._preface_left -= position
        if self._header:  # the rest of a frame header split across reads
            need = FRAME_HEADER_SIZE - len(self._header)
            self._header += data[position : position + need]
            position += need
            if len(self._header) < FRAME_HEADER_SIZE:
                return
            header = bytes(self._header)
            self._header.clear()
            self._skip = int.from_bytes(header[:3], "big")
            self._frame(header[3], header[4], self._skip, now)
        end = len(data)
        position += self._skip
        # Frame by frame, reading each header in place: a read holds many small frames.
        while position + FRAME_HEADER_SIZE <= end:
            length = (data[position] << 16) | (data[position + 1] << 8) | data[position + 2]
            self._frame(data[position + 3], data[position + 4], length, now)
            position += FRAME_HEADER_SIZE + length
        if position < end:
            self._header += data[position:]
            self._skip = 0
        else:
            self._skip = position - end  # payload bytes still to come

    def _frame(self, kind: int, flags: int, length: int, now: float) -> None:
        limits = self.limits
        if kind == HEADERS or kind == CONTINUATION or kind == PUSH_PROMISE:
            if kind == CONTINUATION:
                self._block_frames += 1
                if self._block_frames > limits.continuation_frames:
                    raise H2Abuse(
                        f"more than {limits.continuation_frames} CONTINUATION frames in one "
                        "header block"
                    )
            else:
                self._block_bytes, self._block_frames = 0, 0
                self.header_block_since = now
            self._block_bytes += length
            if self._block_bytes > limits.header_block_bytes:
                raise H2Abuse(f"header block over {limits.header_block_bytes} bytes")
            if flags & FLAG_END_HEADERS:
                self.header_block_since = None
            elif length == 0:
                self._empty.add(now, "empty frames")
        elif kind == DATA:
            if length == 0 and not flags & FLAG_END_STREAM:
                self._empty.add(now, "empty frames")
        elif kind == RST_STREAM:
            self._resets.add(now, "reset or refused streams")
        elif kind == SETTINGS:
            if not flags & FLAG_ACK:
                self._settings.add(now, "SETTINGS frames")
        elif kind == PING:
            if not flags & FLAG_ACK:
                self._pings.add(now, "PING frames")
        elif kind == PRIORITY:
            self._empty.add(now, "empty frames")


def request_head(
    header_block: Iterable[tuple[bytes, bytes]],
    *,
    end_stream: bool,
    scheme: bytes,
    client_ip: bytes,
    max_header_count: int,
) -> RequestHead:
    """The protocol-neutral request head for one HTTP/2 request.

    h2 has already validated the block as RFC 9113 asks (pseudo-headers present and first,
    lower-case names, no connection-specific fields). Here ``:authority`` becomes the
    authority (``Host`` only when it is missing), cookie crumbs are joined, the request goes
    through the validation HTTP/1.1 requests go through too, and ``scheme`` is how the client
    reached us, not what it claims.
    """
    pseudo, fields = h2_request_to_h1(header_block)
    if len(fields) > max_header_count:
        raise ClientError(f"more than {max_header_count} request headers", status=431)
    method = pseudo.get(b":method", b"")
    if method == b"CONNECT":
        raise ClientError("CONNECT is not supported by a reverse proxy", status=405)
    authority = pseudo.get(b":authority", b"")
    headers: Headers = []
    content_length: int | None = None
    for name, value in fields:
        if name == b"host":
            authority = authority or value
            continue
        if name == b"content-length":
            if not value.isdigit():
                raise ClientError("bad Content-Length")
            if content_length is not None and int(value) != content_length:
                raise ClientError("conflicting Content-Length values")
            if content_length is not None:
                continue
            content_length = int(value)
        headers.append((name, value))
    if not authority:
        raise ClientError("request has neither :authority nor Host")
    if end_stream and content_length:
        # h2 holds a length against the DATA frames, not against END_STREAM on HEADERS; an
        # upstream would wait for the body it announces (RFC 9113 8.1.1: malformed).
        raise ClientError(f"Content-Length {content_length} on a request without a body")
    target = pseudo.get(b":path", b"/")
    check_request(
        method,
        target,
        authority,
        scheme=pseudo.get(b":scheme", scheme),
        version=b"2",
        fields=headers,
    )
    return RequestHead(
        method=method,
        target=target,
        authority=authority,
        scheme=scheme,
        headers=headers,
        http_version=b"2",
        client_ip=client_ip,
        has_body=not end_stream,
        content_length=content_length,
        validated=True,
    )


def never_indexed(block: list[tuple[bytes, bytes]], name: bytes) -> None:
    """Mark the field ``name`` in a response header ``block`` as one HPACK must not index.

    For the request ID, new in every response: indexed, each one would take a place in the
    connection's dynamic table, pushing out the fields that repeat (``server``, ``via``,
    ``content-type``), which then go out as literals again, and HPACK's encoder searches
    that table linearly for every field it sends. (Its name is still found in the table
    while an indexed one is there.)
    """
    for index in range(len(block) - 1, 0, -1):
        if block[index][0] == name:
            block[index] = NeverIndexedHeaderTuple(*block[index])
            return


class PlainLiteralEncoder(Encoder):
    """hpack's encoder, writing string literals as they are instead of Huffman-coded.

    A response block is mostly fields the client's table already holds (sent as indexes);
    the literal nearly every one carries is the request ID, new each time, and hpack
    Huffman-codes in a Python loop over its bytes, which makes it the dearest field of the
    block for the few bytes it saves (RFC 7541 lets an encoder choose per string).
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


# -- h2's inbound header checks, run here: fast for an ordinary request ------------------

# RFC 9113 section 8.2.1, as h2's _reject_illegal_characters reads it: a name is visible
# ASCII but upper case and ':' (a leading ':' marks a pseudo-header); a value holds no NUL,
# CR or LF and neither starts nor ends with SP or HTAB. NUL is in neither, so a block's
# names (or values) joined with NUL are checked by one match. Names here are also
# non-empty (h2's next check).
_NAME = rb"(?::[!-9;-@\[-~]*|[!-9;-@\[-~]+)"
_VALUE = rb"(?:[^\x00\n\r\t ](?:[^\x00\n\r]*[^\x00\n\r\t ])?)?"
_NAMES_OK = re.compile(_NAME + rb"(?:\x00" + _NAME + rb")*")
_VALUES_OK = re.compile(_VALUE + rb"(?:\x00" + _VALUE + rb")*")
# An ordinary request has exactly these pseudo-headers; anything else (CONNECT, :protocol,
# a missing one, Host, TE, connection-specific fields) takes h2's own checks.
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_UNUSUAL_NAMES = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"}
    | {b"te", b"host"}
)
# The flags h2 checks a server's received blocks with.
REQUEST_BLOCK = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
TRAILERS_BLOCK = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)


class HeaderBlockRefused(Exception):
    """A received header block that h2's inbound checks refuse.

    ``error`` is h2's own ``ProtocolError``; ``last_stream_id`` the highest stream h2 had
    opened when its checks, run inside ``receive_data``, would have raised it: what its
    GOAWAY names.
    """

    def __init__(self, error: h2.exceptions.ProtocolError, last_stream_id: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.last_stream_id = last_stream_id


def check_header_blocks(events: Iterable[Any], highest_stream_id: int) -> None:
    """h2's inbound header checks on the blocks among ``events``, with its verdicts.

    The front end turns h2's own (``validate_inbound_headers``, with the cookie joining of
    ``normalize_inbound_headers`` before it) off: h2 runs every block through eight chained
    generators, the first of which looks at every byte of every name and value in a Python
    loop (9 us for h2load's 7 fields, 25 us for a browser-like block). Here a request block
    that :func:`check_header_block` finds ordinary is passed in one pass, and any other
    block (trailers too) goes through the same h2 functions in the same order. Raises
    :class:`HeaderBlockRefused` for the first refused block; ``highest_stream_id``: h2's
    ``highest_inbound_stream_id`` before the bytes that made ``events``.
    """
    for event in events:
        if isinstance(event, h2.events.RequestReceived):
            highest_stream_id = max(highest_stream_id, event.stream_id or 0)
            flags = REQUEST_BLOCK
        elif isinstance(event, h2.events.TrailersReceived):
            flags = TRAILERS_BLOCK
        else:
            continue
        try:
            check_header_block(event.headers or [], flags)
        except h2.exceptions.ProtocolError as exc:
            raise HeaderBlockRefused(exc, highest_stream_id) from None


def check_header_block(headers: list[Any], flags: Any) -> None:
    """Raise the ``ProtocolError`` h2's inbound checks raise for a received block, if any."""
    if flags is REQUEST_BLOCK and _ordinary_request(headers):
        return
    for _ in h2.utilities.validate_headers(
        h2.utilities.normalize_inbound_headers(headers, flags), flags
    ):
        pass


# What the names of a block say, whatever its values: ``None``, not an ordinary request; else
# the places of the values that still decide: ``:method``, ``:path``, and the last cookie
# crumb when there are several (-1: not). A client sends the same names in the same order
# request after request, so this is worked out once per client kind, not per request.
_Shape = tuple[int, int, int] | None
_shapes: dict[bytes, _Shape] = {}
_SHAPES_KEPT = 256  # then the memo starts again: it cannot grow without end
_SHAPE_NAMES_BYTES = 2048  # longer name lists are worked out each time, not kept
_UNKNOWN: Any = object()


def _ordinary_request(headers: list[Any]) -> bool:
    """A request block with exactly the four pseudo-headers first, none of them twice, a
    non-empty ``:path``, not CONNECT, no Host, TE or connection-specific field, and names
    and values the regexes accept: one that h2's checks accept unchanged."""
    try:
        names = b"\x00".join([header[0] for header in headers])
        values = b"\x00".join([header[1] for header in headers])
    except TypeError:  # str fields (h2 with a header_encoding): h2's checks take those
        return False
    shape = _shapes.get(names, _UNKNOWN)
    if shape is _UNKNOWN:
        shape = _shape(headers, names)
        if len(names) <= _SHAPE_NAMES_BYTES:
            if len(_shapes) >= _SHAPES_KEPT:
                _shapes.clear()
            _shapes[names] = shape
    if shape is None:
        return False
    method, path, last_crumb = shape
    return (
        # A NUL inside a value would pass for a separator: the count says there is none.
        values.count(0) == len(headers) - 1
        and _VALUES_OK.fullmatch(values) is not None
        and headers[method][1] != b"CONNECT"
        and headers[path][1] != b""
        # h2 checks cookie crumbs joined with "; " (and moved last): an empty last one
        # leaves a value ending in a space, which it refuses.
        and (last_crumb < 0 or headers[last_crumb][1] != b"")
    )


def _shape(headers: list[Any], names: bytes) -> _Shape:
    if names.count(0) != len(headers) - 1 or _NAMES_OK.fullmatch(names) is None:
        return None
    pseudo: dict[bytes, int] = {}
    regular = len(headers)
    for index, header in enumerate(headers):
        name = header[0]
        if name[0] != 0x3A:  # the pseudo-headers are over
            regular = index
            break
        if name not in _REQUEST_PSEUDO or name in pseudo:
            return None
        pseudo[name] = index
    if len(pseudo) != 4:
        return None
    crumbs = []
    for index in range(regular, len(headers)):
        name = headers[index][0]
        if name[0] == 0x3A or name in _UNUSUAL_NAMES:
            return None
        if name == b"cookie":
            crumbs.append(index)
    return pseudo[b":method"], pseudo[b":path"], crumbs[-1] if len(crumbs) > 1 else -1
