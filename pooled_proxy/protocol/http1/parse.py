"""The HTTP/1.1 parser: strict framing checks over every byte received, before anything else
reads them, and the parse of every head they accept.

h11 is a correct parser but a lenient one, and leniency is what request smuggling feeds on:
it unfolds obsolete line folding, merges repeated identical ``Content-Length`` headers
(also ``Content-Length: 5, 5``), accepts a bare LF as a line end (so ``X: a\\nTransfer-Encoding:
chunked`` is two headers to h11 but one header with an LF in it to a strict peer), takes up to
20 hex digits of chunk size and anything after a ``;`` in a chunk line, and accepts a complete
head larger than its limit if it arrives in one piece. A peer (a CDN in front of us, an
upstream behind us) that reads such bytes differently sees different message boundaries.

So every byte the front end or the upstream client receives goes through a checker here
first, and only bytes it accepts are read further (by the connection objects in
connection.py, from the heads parsed here, or by h11). The checker parses the stream itself, as strictly
as RFC 9112 allows a recipient to: CRLF line ends only, no NUL, CR or LF inside a line, no
other control characters in field values, no obs-fold, no whitespace between a field name and
its colon, at most one ``Content-Length`` (plain digits) and one ``Transfer-Encoding``
(exactly ``chunked``), never both, at most one ``Host``, no ``Transfer-Encoding`` in HTTP/1.0,
chunk sizes of at most 16 hex digits with CRLF exactly where it belongs. Because it tracks
message boundaries on its own, any bytes it accepts are framed by h11 the same way.

A request's method must be a token and its target visible ASCII, and its ``Connection`` may
not name ``Content-Length``, ``Transfer-Encoding`` or ``Host``: those frame the request, and
stripping them as hop-by-hop would forward it framed otherwise. With this the method, the
target's bytes and every field of a request head it accepts also pass the request validation
both front ends share (request_checks.py, the same grammar), which then does not look at them
again.

Sans-IO: bytes in, each head parsed (:class:`Head`) or a :class:`Violation` out (with the
status a client should get); no trio.
"""

from __future__ import annotations

from enum import Enum, auto

from ._abnf import (
    BARE_CR_OR_LF,
    CHUNK_LINE,
    CONTENT_LENGTH,
    FIELD_LINE,
    FIELD_LINES,
    FIELD_VALUE_RE,
    OWS,
    REQUEST_LINE,
    START_LINE,
    STATUS_LINE,
    TARGET_RE,
    TOKEN_RE,
)

__all__ = [
    "Head",
    "RequestChecker",
    "ResponseChecker",
    "Violation",
    "check_head",
    "response_has_no_body",
]

LF = b"\n"
MAX_CHUNK_LINE = 4096  # size plus extensions; real clients send a few bytes


class Violation(Exception):
    """Bytes received that break HTTP/1.1 (framing, or h11's own reading of the rest);
    ``status`` is the answer a client should get.

    ``clean_bytes``: how many bytes of the ``feed()`` that raised it came before the block
    (head, chunk line, trailers) at fault. They are whole messages or body bytes, safe to
    parse, so pipelined requests ahead of a bad one are still served in order.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.clean_bytes = 0


def response_has_no_body(method: bytes, status: int) -> bool:
    """RFC 9112 6.3: a final response that ends at its head, whatever its headers say about
    a body. The one place this rule is written, for both directions."""
    return method == b"HEAD" or status == 204 or status == 304


class _Framing(Enum):
    NONE = auto()
    LENGTH = auto()
    CHUNKED = auto()
    UNTIL_CLOSE = auto()


class Head:
    """What the framing checks learned from one valid head.

    The fields are parsed as strictly as the checks go, so a caller may take them instead
    of parsing the head a second time (the connection objects' direct path does).
    """

    __slots__ = (
        "chunked",
        "content_length",
        "fields",
        "method",
        "start_line",
        "status",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.start_line = b""
        self.version = b""  # b"1.1", b"1.0"
        self.method = b""  # requests only
        self.target = b""  # requests only
        self.status = 0  # responses only
        self.content_length: int | None = None
        self.chunked = False
        self.fields: list[tuple[bytes, bytes]] = []  # lower-case names, OWS-trimmed values


def _field_lines(
    lines: list[bytes], *, max_count: int | None, what: str
) -> list[tuple[bytes, bytes]]:
    """Validate header (or trailer) lines; names are returned lower-case."""
    if max_count is not None and len(lines) > max_count:
        raise Violation(f"more than {max_count} {what} fields", 431)
    if FIELD_LINES.fullmatch(b"\r\n".join(lines) + b"\r\n"):
        # All valid (one regex over the block): split them without matching each again.
        fields: list[tuple[bytes, bytes]] = []
        for line in lines:
            name, _, value = line.partition(b":")
            fields.append((name.lower(), value.strip(OWS)))
        return fields
    fields = []
    for line in lines:
        match = FIELD_LINE.fullmatch(line)
        if match is not None:
            fields.append((match.group(1).lower(), match.group(2)))
            continue
        # Not a valid line: say what is wrong with it.
        if line[:1] in (b" ", b"\t"):
            raise Violation(f"obsolete line folding in {what}")
        name, colon, value = line.partition(b":")
        if not colon:
            raise Violation(f"{what} line without a colon")
        if not TOKEN_RE.fullmatch(name):
            # Catches "Name :" (whitespace before the colon) and empty or non-token names.
            raise Violation(f"invalid {what} field name {name[:40]!r}")
        value = value.strip(OWS)
        if not FIELD_VALUE_RE.fullmatch(value):
            raise Violation(f"control character in the value of {what} field {name.decode()!r}")
        fields.append((name.lower(), value))
    return fields


def check_head(
    raw: bytes, *, request: bool, max_header_count: int | None = None, scanned: bool = False
) -> Head:
    """Validate one complete head: ``raw`` runs from the start line to the final CRLF CRLF.

    ``scanned``: the caller already refused NUL and bare CR or LF in it (the stream checkers
    do, as the bytes arrive). Raises :class:`Violation`; returns what body framing needs.
    """
    if not raw.endswith(b"\r\n\r\n"):
        raise Violation("head does not end with CRLF CRLF")
    if not scanned:
        if b"\x00" in raw:
            raise Violation("NUL in head")
        if BARE_CR_OR_LF.search(raw):
            raise Violation("bare CR or LF in head")
    lines = raw[:-4].split(b"\r\n")
    head = Head()
    head.start_line = lines[0]
    if not START_LINE.fullmatch(lines[0]):
        raise Violation("control character in start line" if lines[0] else "empty start line")
    if request:
        match = REQUEST_LINE.fullmatch(lines[0])
        if match is None:
            raise Violation(_request_line_fault(lines[0]))
        head.method, head.target, head.version = match.groups()
    else:
        match = STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise Violation("malformed status line")
        head.version = lines[0][5:8]
        head.status = int(match.group(1))
    hosts = 0
    transfer_encodings = 0
    head.fields = _field_lines(lines[1:], max_count=max_header_count, what="header")
    for name, value in head.fields:
        if name == b"content-length":
            if head.content_length is not None:
                raise Violation("repeated Content-Length")
            if not CONTENT_LENGTH.fullmatch(value):
                raise Violation(f"invalid Content-Length {value[:40]!r}")
            head.content_length = int(value)
        elif name == b"transfer-encoding":
            transfer_encodings += 1
            if transfer_encodings > 1:
                raise Violation("repeated Transfer-Encoding")
            if value.lower() != b"chunked":
                # RFC 9112 6.1: a transfer coding we do not implement is a 501, not a 400.
                raise Violation(f"unsupported Transfer-Encoding {value[:40]!r}", 501)
            head.chunked = True
        elif name == b"host":
            hosts += 1
        elif name == b"connection" and request:
            _check_connection_options(value)
    if head.chunked and head.content_length is not None:
        raise Violation("both Content-Length and Transfer-Encoding")
    if head.chunked and head.version == b"1.0":
        raise Violation("Transfer-Encoding in an HTTP/1.0 message")  # RFC 9112 6.1
    if request and hosts > 1:
        raise Violation("more than one Host header")  # RFC 9112 3.2
    return head


def _request_line_fault(line: bytes) -> str:
    method, _, rest = line.partition(b" ")
    target = rest.rpartition(b" ")[0]
    if not TOKEN_RE.fullmatch(method):
        return f"invalid method {method[:40]!r}"
    if target and not TARGET_RE.fullmatch(target):
        return f"invalid request target {target[:40]!r}"
    return "malformed request line"


# Fields that frame a request (its body, or where it goes): a Connection option naming one
# would have it stripped as hop-by-hop, and the request forwarded with another framing.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding", b"host"})


def _check_connection_options(value: bytes) -> None:
    for option in value.split(b","):
        option = option.strip(OWS).lower()
        if option in _FRAMING_FIELDS:
            raise Violation(
                f"Connection names {option.decode()}, which frames the request: not hop-by-hop"
            )


class _State(Enum):
    HEAD = auto()
    LENGTH_BODY = auto()
    CHUNK_LINE = auto()
    CHUNK_DATA = auto()
    CHUNK_END = auto()  # the CRLF after a chunk's data
    TRAILERS = auto()
    UNTIL_CLOSE = auto()
    IDLE = auto()  # responses: nothing is due until the next request goes out
    STOPPED = auto()  # the protocol was switched: the bytes are no longer HTTP/1.1


class _StreamChecker:
    """The message-stream parser both directions share; subclasses frame what follows a head."""

    def __init__(self, *, max_head_bytes: int, max_header_count: int | None) -> None:
        self.max_head_bytes = max_head_bytes
        self.max_header_count = max_header_count
        self._state = _State.HEAD
        self._block = bytearray()  # the head, chunk line or trailer section so far
        self._scanned = 0  # how much of _block was already checked for NUL and bare CR/LF
        self._remaining = 0  # bytes left of a Content-Length body or of a chunk
        self._offset = 0  # stream position of the next byte to check
        self._block_start = 0  # stream position where the current block began
        self.heads = 0  # complete heads accepted
        # The last head accepted, and where it begins and ends in the stream (byte offsets
        # counted from the first byte fed).
        self.head: Head | None = None
        self.head_start = 0
        self.head_end = 0
        self._start = b""  # what every head must begin with, checked as soon as it arrives

    def feed(self, data: bytes) -> None:
        """Check the next bytes received; ``b""`` (end of stream) is never a violation here."""
        fed_at = self._offset
        try:
            if self._state is _State.HEAD and not self._block:
                self._offset += self._whole_head(data)
                rest = len(data) - (self._offset - fed_at)
                # (_whole_head moved the state on; mypy still holds it at HEAD.)
                if self._state is _State.LENGTH_BODY and 0 < self._remaining <= rest:  # type: ignore[comparison-overlap]
                    # The usual small response: its whole body came with its head.
                    self._offset += self._remaining
                    self._remaining = 0
                    self._state = self._after_message()
            if self._offset - fed_at < len(data):
                view = memoryview(data)
                while self._offset - fed_at < len(view):
                    self._offset += self._step(view[self._offset - fed_at :])
        except Violation as exc:
            exc.clean_bytes = max(0, self._block_start - fed_at)
            raise

    def _whole_head(self, data: bytes) -> int:
        """The usual case: ``data`` starts with a whole, clean head. Check it straight from
        ``data`` (no copy into the block buffer) and return its length; 0 for anything else,
        which the state machine then takes byte for byte, violations included."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4 or end > self.max_head_bytes or not data.startswith(self._start):
            return 0
        # No bare CR or LF: every CR and every LF is part of a CRLF. (Three counts in C
        # take a sixth of the time of the regex search the state machine uses.)
        line_ends = data.count(b"\r\n", 0, end)
        if (
            data.count(b"\n", 0, end) != line_ends
            or data.count(b"\r", 0, end) != line_ends
            or data.find(b"\x00", 0, end) >= 0
        ):
            return 0
        self._block_start = self._offset
        self._on_head(bytes(data[:end]))
        return end

    # -- subclass hooks ------------------------------------------------------------------

    def _check_head(self, raw: bytes) -> Head:
        raise NotImplementedError

    def _after_head(self, head: Head) -> _Framing:
        raise NotImplementedError

    def _after_message(self) -> _State:
        raise NotImplementedError

    # -- the state machine -----------------------------------------------------------------

    def _step(self, data: memoryview) -> int:
        """Check the start of ``data``; returns how many bytes that took."""
        state = self._state
        if state is _State.LENGTH_BODY or state is _State.CHUNK_DATA:
            taken = min(self._remaining, len(data))
            self._remaining -= taken
            if not self._remaining:
                if state is _State.LENGTH_BODY:
                    self._state = self._after_message()
                else:
                    self._state = _State.CHUNK_END
            return taken
        if state is _State.UNTIL_CLOSE or state is _State.IDLE or state is _State.STOPPED:
            return len(data)
        if not self._block:
            self._block_start = self._offset
        if state is _State.CHUNK_END:
            need = 2 - len(self._block)
            self._block += data[:need]
            if len(self._block) == 2:
                if self._block != b"\r\n":
                    raise Violation("chunk data not followed by CRLF")
                self._block.clear()
                self._state = _State.CHUNK_LINE
            return min(need, len(data))
        return self._collect(data)

    def _collect(self, data: memoryview) -> int:
        """Collect a CRLF-delimited block (head, chunk line, trailers); check it once complete."""
        state = self._state
        block = self._block
        start = len(block)
        block += data
        if state is _State.CHUNK_LINE:
            end = block.find(b"\r\n", max(0, start - 1))
            end = end + 2 if end >= 0 else -1
            limit, status, what = MAX_CHUNK_LINE, 400, "chunk size line"
        elif state is _State.TRAILERS and block[:2] == b"\r\n":
            end = 2
            limit, status, what = self.max_head_bytes, 431, "trailer section"
        else:
            end = block.find(b"\r\n\r\n", max(0, start - 3))
            end = end + 4 if end >= 0 else -1
            limit, status, what = self.max_head_bytes, 431, "head"
            if state is _State.TRAILERS:
                what = "trailer section"
        complete = end if end >= 0 else len(block)
        # Garbage instead of a status line is refused at once, not after a timeout.
        if (
            state is _State.HEAD
            and start < len(self._start)
            and block[: len(self._start)] != self._start[: len(block)]
        ):
            raise Violation(f"{what} does not start with {self._start.decode()}")
        # Bare CR or LF and NUL are refused as soon as they arrive, before h11 can read a
        # head ending in LF LF that this parser would still be waiting on.
        scan_from = max(0, self._scanned - 1)
        if block.find(b"\x00", scan_from, complete) >= 0:
            raise Violation(f"NUL in {what}")
        bad = BARE_CR_OR_LF.search(block, scan_from, complete)
        if bad is not None:
            raise Violation(f"bare {'LF' if bad.group() == LF else 'CR'} in {what}")
        if complete > limit:
            raise Violation(f"{what} longer than {limit} bytes", status)
        if end < 0:
            self._scanned = len(block)
            return len(data)
        raw = bytes(block[:end])
        block.clear()
        self._scanned = 0
        if state is _State.HEAD:
            self._on_head(raw)
        elif state is _State.CHUNK_LINE:
            self._on_chunk_line(raw)
        else:
            lines = raw[:-4].split(b"\r\n") if raw != b"\r\n" else []
            _field_lines(lines, max_count=self.max_header_count, what="trailer")
            self._state = self._after_message()
        return end - start

    @property
    def offset(self) -> int:
        """How many bytes were fed and accepted so far."""
        return self._offset

    def _on_head(self, raw: bytes) -> None:
        head = self._check_head(raw)
        self.heads += 1
        self.head = head
        self.head_start = self._block_start
        self.head_end = self._block_start + len(raw)
        framing = self._after_head(head)
        if framing is _Framing.CHUNKED:
            self._state = _State.CHUNK_LINE
        elif framing is _Framing.LENGTH and head.content_length:
            self._remaining = head.content_length
            self._state = _State.LENGTH_BODY
        elif framing is _Framing.UNTIL_CLOSE:
            self._state = _State.UNTIL_CLOSE
        else:
            self._state = self._after_message()

    def _on_chunk_line(self, raw: bytes) -> None:
        match = CHUNK_LINE.fullmatch(raw, 0, len(raw) - 2)
        if match is None:
            raise Violation(f"invalid chunk size line {raw[:40]!r}")
        size = int(match.group(1), 16)
        if size:
            self._remaining = size
            self._state = _State.CHUNK_DATA
        else:
            self._state = _State.TRAILERS


class RequestChecker(_StreamChecker):
    """Checks what a client sends: a stream of requests, pipelined or one by one.

    Bytes behind a request proposing a protocol switch (``Upgrade``) are checked as the next
    request too: a client must wait for the ``101`` before it speaks the new protocol (RFC
    6455 4.1), and once the switch happens the front end stops feeding this checker.
    """

    def __init__(self, *, max_head_bytes: int, max_header_count: int | None = None) -> None:
        super().__init__(max_head_bytes=max_head_bytes, max_header_count=max_header_count)

    def _check_head(self, raw: bytes) -> Head:
        return check_head(raw, request=True, max_header_count=self.max_header_count, scanned=True)

    def _after_head(self, head: Head) -> _Framing:
        if head.chunked:
            return _Framing.CHUNKED
        return _Framing.LENGTH if head.content_length else _Framing.NONE

    def _after_message(self) -> _State:
        return _State.HEAD


class ResponseChecker(_StreamChecker):
    """Checks what an upstream sends: the response(s) to one request at a time."""

    def __init__(self, *, max_head_bytes: int) -> None:
        super().__init__(max_head_bytes=max_head_bytes, max_header_count=None)
        self._state = _State.IDLE
        self._start = b"HTTP/"
        self._method = b""
        self._final = False
        self._switched = False

    def expect(self, method: bytes) -> None:
        """A request went out: its response (after any 1xx) comes next."""
        self._method = method
        self._final = self._switched = False
        self._block.clear()
        self._scanned = 0
        self._state = _State.HEAD

    def _check_head(self, raw: bytes) -> Head:
        return check_head(raw, request=False, scanned=True)

    def _after_head(self, head: Head) -> _Framing:
        status = head.status
        if status == 101:
            self._final = self._switched = True
            return _Framing.NONE
        self._final = status >= 200
        # RFC 9112 6.3: these responses end at the head, whatever they say about a body.
        if status < 200 or response_has_no_body(self._method, status):
            return _Framing.NONE
        if head.chunked:
            return _Framing.CHUNKED
        if head.content_length is not None:
            return _Framing.LENGTH
        return _Framing.UNTIL_CLOSE

    def _after_message(self) -> _State:
        if not self._final:
            return _State.HEAD  # that was a 1xx: the real response follows
        # After a 101 the bytes belong to the new protocol; after a final response nothing is
        # due (h11 keeps any stray bytes, and the connection is then not reused).
        return _State.STOPPED if self._switched else _State.IDLE
