"""The HTTP/2 front end's inbound header checks give h2's own verdicts.

The front end turns h2's inbound checks off and runs ``check_header_block`` on the blocks h2
hands it, unchanged: its verdict (and message) must be what h2's own pipeline, cookie crumbs
joined first, gives the same block."""

from __future__ import annotations

import h2.utilities
from h2.exceptions import ProtocolError
from hypothesis import given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.h2_server import (
    REQUEST_BLOCK,
    TRAILERS_BLOCK,
    _ordinary_request,
    check_header_block,
)

# The bytes at the edges of every range the RFC 9113 section 8.2.1 rules draw.
EDGES = [0, 9, 10, 13, 31, 32, 33, 57, 58, 59, 64, 65, 90, 91, 96, 97, 122, 126, 127, 128, 255]
NAMES = [
    b":method",
    b":scheme",
    b":authority",
    b":path",
    b":status",
    b":protocol",
    b":x",
    b":",
    b"",
    b"host",
    b"te",
    b"connection",
    b"upgrade",
    b"accept",
    b"Accept",
    b"x:y",
    b"cookie",
]
VALUES = [
    b"GET",
    b"CONNECT",
    b"",
    b"/",
    b"http",
    b"a.example",
    b"trailers",
    b" a",
    b"a\t",
    b"a\x00b",
]
NAME = st.sampled_from(NAMES) | st.lists(st.sampled_from(EDGES), max_size=4).map(bytes)
VALUE = st.sampled_from(VALUES) | st.lists(st.sampled_from(EDGES), max_size=4).map(bytes)
REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.example"),
    (b":path", b"/"),
]
FLAGS = st.sampled_from([REQUEST_BLOCK, TRAILERS_BLOCK])
SERVER_REQUEST = REQUEST_BLOCK


def ours(headers, flags):
    check_header_block(list(headers), flags)


def h2s(headers, flags):
    """h2's inbound pipeline, as h2.stream runs it when its checks are on."""
    headers = h2.utilities.normalize_inbound_headers(iter(headers), flags)
    list(h2.utilities.validate_headers(headers, flags))


def verdict(check, headers, flags):
    try:
        check(headers, flags)
    except ProtocolError as exc:
        return ("refused", str(exc))
    return "accepted"


ORDINARY_NAME = st.sampled_from([b"accept", b"user-agent", b"cookie", b"x-a"])
ORDINARY_VALUE = st.sampled_from([b"*/*", b"a b", b"x"])
PSEUDO_VALUE = st.sampled_from([b"GET", b"CONNECT", b"", b"/", b" /"])


@settings(max_examples=400)
@given(
    st.permutations(REQUEST).flatmap(lambda pseudo: st.integers(2, 4).map(lambda n: pseudo[:n])),
    st.lists(st.tuples(st.booleans(), PSEUDO_VALUE), min_size=4, max_size=4),
    st.lists(st.tuples(NAME, VALUE) | st.tuples(ORDINARY_NAME, ORDINARY_VALUE), max_size=4),
    st.integers(0, 8),
    FLAGS,
)
def test_same_verdict_and_message_as_h2(pseudo, pseudo_values, fields, at, flags):
    # The pseudo-headers keep their ordinary values or take odd ones.
    pseudo = [
        (name, odd if change else value)
        for (name, value), (change, odd) in zip(pseudo, pseudo_values)
    ]
    headers = pseudo + fields
    headers[at:at] = fields[:1]  # and one of them somewhere else, maybe among the pseudo ones
    for flags_ in (flags, SERVER_REQUEST):
        assert verdict(ours, headers, flags_) == verdict(h2s, headers, flags_)


def _with(**changes):
    return [(name, changes.get(name[1:].decode(), value)) for name, value in REQUEST]


EDGE_BLOCKS = [
    _with(path=b""),
    _with(method=b"CONNECT"),
    *[REQUEST[:i] + REQUEST[i + 1 :] for i in range(4)],  # each pseudo-header missing
    [*REQUEST, (b":path", b"/again")],
    [*REQUEST[:2], (b"accept", b"*/*"), *REQUEST[2:]],
    [*REQUEST, (b"host", b"a.example")],
    [*REQUEST, (b"host", b"b.example")],
    [*REQUEST, (b"te", b"trailers")],
    [*REQUEST, (b"te", b"gzip")],
    [*REQUEST, (b"connection", b"close")],
    [*REQUEST, (b":protocol", b"websocket")],
    [*REQUEST, (b"accept", b" x")],
    [*REQUEST, (b"", b"x")],
    [*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"")],
    [*REQUEST, (b"cookie", b""), (b"cookie", b"")],
    [*REQUEST, (b"cookie", b""), (b"cookie", b"a=1")],
    [*REQUEST, (b"cookie", b"")],
    [*REQUEST, (b"cookie", b"a=1 "), (b"cookie", b"b=2")],
    [(b"cookie", b"a=1"), *REQUEST],
]


def test_edge_blocks_get_h2s_verdict():
    for headers in EDGE_BLOCKS:
        assert verdict(ours, headers, SERVER_REQUEST) == verdict(h2s, headers, SERVER_REQUEST), (
            headers
        )


def test_every_single_byte_in_a_name_and_a_value():
    for byte in range(256):
        for field in (
            (bytes([byte]), b"v"),
            (b"n", bytes([byte])),
            (b"a" + bytes([byte]) + b"b", b"v"),
        ):
            headers = [*REQUEST, field, (b"accept", b"*/*")]
            assert verdict(ours, headers, SERVER_REQUEST) == verdict(h2s, headers, SERVER_REQUEST)


def test_an_ordinary_request_takes_the_fast_path():
    # Else the tests above would compare h2 with itself.
    assert _ordinary_request(
        [*REQUEST, (b"user-agent", b"h2load nghttp2/1.52.0"), (b"cookie", b"a=b")]
    )
    assert _ordinary_request([*REQUEST, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert not _ordinary_request([*REQUEST, (b"host", b"a.example")])
    assert not _ordinary_request(REQUEST[1:])
