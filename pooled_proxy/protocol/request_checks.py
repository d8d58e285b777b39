"""The one validation every request passes before the forwarder sees it, whatever its protocol.

Both front ends build their protocol-neutral request through :func:`check_request`, so a
request gets the same verdict over HTTP/1.1 and HTTP/2, and it runs before an upstream
connection is taken: anything the upstream writer (h11, or the HTTP/1.1 codec's direct path)
would refuse is refused here first, as the client's mistake (400; 505 for an HTTP version we
do not speak), never as an upstream server's failure.

Over HTTP/1.1 the method, the target's bytes and every field already passed the framing checks
of the HTTP/1.1 parser (http1/parse.py), which read them with this same grammar (abnf.py): the
front end says so with ``syntax_checked`` and they are not looked at twice. HTTP/2 forbids the ``Connection`` header
(RFC 9113 8.2.2; h2 refuses it), so the one rule about what it names lives in the HTTP/1.1
checks alone.

Sans-IO: bytes in, :class:`~pooled_proxy.errors.ClientError` out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import ClientError
from .abnf import AUTHORITY, FIELD_VALUE, ORIGIN_FORM, TOKEN

__all__ = ["check_request"]

_TOKEN = re.compile(TOKEN)
_ORIGIN_FORM = re.compile(ORIGIN_FORM)
_AUTHORITY = re.compile(AUTHORITY)
# Every name (or every value) of a request joined with NUL, checked by one match: NUL is in
# neither grammar, so it can only be a separator.
_NAMES = re.compile(TOKEN + rb"(?:\x00" + TOKEN + rb")*")
_VALUES = re.compile(FIELD_VALUE + rb"(?:\x00" + FIELD_VALUE + rb")*")
_VALUE = re.compile(FIELD_VALUE)
_SCHEMES = (b"http", b"https")
# The last authority that matched the grammar: most requests name the same one as the one
# before, and then a comparison replaces the regex match. Only a match is remembered: the
# empty authority an HTTP/1.0 request may have is no pass for a later request.
_accepted_authority = b"\x00"


def check_request(
    method: bytes,
    target: bytes,
    authority: bytes,
    *,
    scheme: bytes,
    version: bytes,
    fields: Sequence[tuple[bytes, bytes]] = (),
    syntax_checked: bool = False,
) -> None:
    """Refuse, with the :class:`ClientError` a client should get, a request the proxy will not
    forward.

    ``target``: origin-form (``/path?query``), or ``*``; an absolute-form target comes in
    split into ``scheme``, ``authority`` and its origin-form. ``scheme``: the one the request
    names (``:scheme``, an absolute-form target's), else the one the client reached us by.
    ``version``: ``b"1.1"``, ``b"1.0"`` or ``b"2"``. ``fields``: the header fields to forward
    (pseudo-headers and Host taken out). ``syntax_checked``: the HTTP/1.1 framing checks have
    checked the method, the target's bytes and the fields.
    """
    if version[:2] != b"1." and version != b"2":
        raise ClientError(f"HTTP/{version.decode('latin-1')} is not supported", status=505)
    if not syntax_checked and not _TOKEN.fullmatch(method):
        raise ClientError(f"invalid method {method[:40]!r}")
    if scheme not in _SCHEMES and scheme.lower() not in _SCHEMES:
        raise ClientError(f"unsupported scheme {scheme[:40]!r}")
    if target[:1] != b"/" or not (syntax_checked or _ORIGIN_FORM.fullmatch(target)):
        if target != b"*":
            raise ClientError(f"invalid request target {target[:40]!r}")
        if method != b"OPTIONS":  # RFC 9112 3.2.4: the asterisk-form is for OPTIONS only
            raise ClientError("request target * is for OPTIONS only")
    global _accepted_authority
    if authority != _accepted_authority:
        if _AUTHORITY.fullmatch(authority):
            _accepted_authority = authority
        elif authority or version != b"1.0":  # (an HTTP/1.0 client may send no Host at all)
            raise ClientError(f"invalid authority {authority[:40]!r}")
    if fields and not syntax_checked:
        _check_fields(fields)


def _check_fields(fields: Sequence[tuple[bytes, bytes]]) -> None:
    names = b"\x00".join([name for name, _ in fields])
    values = b"\x00".join([value for _, value in fields])
    if _NAMES.fullmatch(names) and _VALUES.fullmatch(values):
        return
    # Not all valid: say which field is wrong.
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            raise ClientError(f"invalid header field name {name[:40]!r}")
        if not _VALUE.fullmatch(value):
            raise ClientError(
                f"invalid value of header field {name.decode('latin-1')!r}: control character "
                "or surrounding whitespace"
            )
