"""The HTTP/1.1 message grammar (RFC 9112), as compiled regular expressions over bytes.

Built on the HTTP grammar both protocols share (``protocol/abnf.py``: tokens, field values,
targets); what is here is how HTTP/1.1 puts them on the wire: field lines, start lines,
chunk lines. The parser reads with these and the serializer's direct path checks what it
writes with them, so that what one accepts the other writes the same way.
"""

from __future__ import annotations

import re

from ..abnf import FIELD_CHAR, FIELD_VALUE, TARGET_CHAR, TOKEN, TOKEN_CHAR

# -- reading ------------------------------------------------------------------------------

TOKEN_RE = re.compile(TOKEN)  # a field name is a token (so no space before the colon)
FIELD_VALUE_RE = re.compile(FIELD_VALUE)  # after trimming OWS
TARGET_RE = re.compile(TARGET_CHAR + rb"+")
# A whole valid field line: the name, then the value without the OWS around it.
_FIELD = rb"(" + TOKEN + rb"):[ \t]*(" + FIELD_VALUE + rb")[ \t]*"
FIELD_LINE = re.compile(_FIELD)  # one line, in one match
FIELD_LINES = re.compile(rb"(?:" + _FIELD + rb"\r\n)*")  # the whole header block at once
START_LINE = re.compile(FIELD_CHAR + rb"+")  # no control bytes
CONTENT_LENGTH = re.compile(rb"[0-9]{1,18}")
# The method a token, the target visible ASCII: what the request validation and h11 accept.
REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") (" + TARGET_CHAR + rb"+) HTTP/([0-9]\.[0-9])")
STATUS_LINE = re.compile(rb"HTTP/[0-9]\.[0-9] ([0-9]{3})(?: .*)?")
# A chunk line: size (16 hex digits reach 2**64; more is an overflow attempt), an optional
# extension without control bytes, trailing whitespace as h11 allows it. h11 allows no
# whitespace before the ";", and neither do we.
CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(;" + FIELD_CHAR + rb"*)?[ \t]*")
# A lone CR (followed by anything but LF) or a lone LF: never a line end here.
BARE_CR_OR_LF = re.compile(rb"\r(?=[^\n])|(?<!\r)\n")
OWS = b" \t"

# -- writing ------------------------------------------------------------------------------

# What a request head h11 writes as it is may hold, checked in C rather than with one regex
# over the head: no control byte but HTAB and the CR LF line ends; a method that is a token
# and a target of visible ASCII; field names that are tokens; values without whitespace at
# either end (h11 refuses it). These are as strict as h11, or stricter (then h11 writes it).
HEAD_BYTES = bytes(b for b in range(256) if b == 0x09 or b in (0x0A, 0x0D) or 0x20 <= b != 0x7F)
VISIBLE_ASCII = bytes(range(0x21, 0x7F))
TOKEN_FULL = re.compile(TOKEN)
TOKENS = re.compile(TOKEN_CHAR + rb"*")
# Request fields that change the message's framing or the connection's state (keep-alive, a
# protocol switch, the body's framing, 100-continue), and a second Host (refused): a request
# with one of these behind its Host is written by h11.
STATEFUL_FIELD = re.compile(
    rb"\r\n(?:connection|content-length|transfer-encoding|upgrade|expect|host):", re.IGNORECASE
)
# The same for a request sent with its whole body, whose Content-Length is checked apart.
STATEFUL_FIELD_BUT_LENGTH = re.compile(
    rb"\r\n(?:connection|transfer-encoding|upgrade|expect|host):", re.IGNORECASE
)
