"""The HTTP/2 front end's faster inbound character check gives h2's own verdicts."""

from __future__ import annotations

import h2.utilities
from h2.exceptions import ProtocolError
from hypothesis import given
from hypothesis import strategies as st

import pooled_proxy.server.http2  # noqa: F401  (installs the check)
from pooled_proxy.protocol.h2_server import _h2_reject_illegal_characters, reject_illegal_characters

# The bytes at the edges of every range the RFC 9113 section 8.2.1 rules draw.
EDGES = [0, 9, 10, 13, 31, 32, 33, 57, 58, 59, 64, 65, 90, 91, 96, 97, 122, 126, 127, 128, 255]
FIELD = st.binary(max_size=6) | st.lists(st.sampled_from(EDGES), max_size=6).map(bytes)


def verdict(check, headers):
    try:
        return list(check(iter(headers), None))
    except ProtocolError as exc:
        return ("refused", str(exc))


@given(st.lists(st.tuples(FIELD, FIELD), max_size=4))
def test_same_verdict_and_message_as_h2(headers):
    assert verdict(reject_illegal_characters, headers) == verdict(_h2_reject_illegal_characters, headers)


def test_every_single_byte_name_and_value():
    for byte in range(256):
        for header in ((bytes([byte]), b"v"), (b"n", bytes([byte])), (b"a" + bytes([byte]) + b"b", b"v")):
            block = [(b":method", b"GET"), header, (b"accept", b"*/*")]
            assert verdict(reject_illegal_characters, block) == verdict(
                _h2_reject_illegal_characters, block
            )


def test_h2_validates_received_headers_with_it():
    assert h2.utilities._reject_illegal_characters is reject_illegal_characters
