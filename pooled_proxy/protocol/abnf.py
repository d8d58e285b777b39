"""The HTTP grammar both protocols share, as regex sources (bytes), named after the RFCs' rules.

One definition for the request validation both front ends build their requests through
(request_checks.py) and the HTTP/1.1 codec (http1/_abnf.py builds its message grammar on it),
so that what one accepts the others accept too.
"""

from __future__ import annotations

# RFC 9110 5.6.2 tchar: methods, field names, transfer codings, connection options.
TOKEN_CHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
TOKEN = TOKEN_CHAR + rb"+"
# RFC 9110 5.5: a field value's bytes are VCHAR, obs-text, SP and HTAB, never another
# control byte (NUL, CR and LF included).
FIELD_CHAR = rb"[^\x00-\x08\x0a-\x1f\x7f]"
FIELD_VCHAR = rb"[^\x00-\x20\x7f]"  # the same without SP and HTAB
# field-value: starts and ends with a field-vchar (the OWS around it is not part of it).
FIELD_VALUE = rb"(?:" + FIELD_VCHAR + rb"(?:" + FIELD_CHAR + rb"*" + FIELD_VCHAR + rb")?)?"
# A request target's bytes: visible ASCII. Not obs-text or controls (RFC 3986 has no place
# for them, and h11 writes none); like h11 and most servers, the ASCII that RFC 3986 only
# allows percent-encoded (`"<>\^`{|}`) passes.
TARGET_CHAR = rb"[!-~]"
ORIGIN_FORM = rb"/" + TARGET_CHAR + rb"*"  # RFC 9112 3.2.1: absolute-path [ "?" query ]
# RFC 3986 3.2.2 host (an IP literal, or a reg-name, which IPv4 addresses are a case of) and
# 3.2.3 port. No userinfo (RFC 9110 4.2.4, RFC 9113 8.3.1), and not empty (an "http" URI
# with an empty host is invalid, RFC 9110 4.2.1).
IP_LITERAL = rb"\[[0-9A-Fa-f:.]+\]"
REG_NAME = rb"(?:[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+"
AUTHORITY = rb"(?:" + IP_LITERAL + rb"|" + REG_NAME + rb")(?::[0-9]*)?"
