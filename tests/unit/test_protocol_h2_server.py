"""The sans-IO part of the HTTP/2 front end: FrameGuard and request_head, without sockets."""

from __future__ import annotations

import itertools

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from pooled_proxy.errors import ClientError
from pooled_proxy.protocol.h2_server import PREFACE, AbuseLimits, FrameGuard, H2Abuse, request_head

LIMITS = AbuseLimits(window=10.0, resets=5, settings=3, pings=3, empty_frames=4,
                     continuation_frames=2, header_block_bytes=100)  # fmt: skip


def feed_split(guard: FrameGuard, data: bytes, cuts: list[int], now: float = 0.0) -> None:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(points):
        guard.feed(data[start:end], now)


def ping(ack: bool = False) -> bytes:
    return PingFrame(0, opaque_data=b"12345678", flags=["ACK"] if ack else []).serialize()


def rst(stream_id: int) -> bytes:
    return RstStreamFrame(stream_id).serialize()


@given(st.lists(st.integers(min_value=0), max_size=20))
def test_the_guard_sees_the_same_frames_however_the_bytes_are_split(cuts):
    # Within limits, with DATA payloads that contain frame-header-looking bytes.
    traffic = PREFACE + SettingsFrame(0).serialize() + ping() * 3 + ping(ack=True) * 10
    traffic += DataFrame(1, data=b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" * 50).serialize()
    traffic += rst(1) * 5 + WindowUpdateFrame(0, window_increment=5).serialize() * 50
    feed_split(FrameGuard(LIMITS), traffic, cuts)  # raises nothing
    with pytest.raises(H2Abuse, match="PING"):
        feed_split(FrameGuard(LIMITS), traffic + ping(), cuts)


@pytest.mark.parametrize(
    "flood, what",
    [
        (rst(1) * 6, "reset or refused streams"),
        (SettingsFrame(0).serialize() * 4, "SETTINGS"),
        (ping() * 4, "PING"),
        (DataFrame(1).serialize() * 5, "empty frames"),
        (PriorityFrame(1, depends_on=3).serialize() * 5, "empty frames"),
    ],
)
def test_each_flood_is_named(flood, what):
    guard = FrameGuard(LIMITS)
    with pytest.raises(H2Abuse, match=what):
        guard.feed(PREFACE + flood, 0.0)


def test_acks_and_end_stream_are_not_floods():
    guard = FrameGuard(LIMITS)
    guard.feed(PREFACE, 0.0)
    guard.feed(SettingsFrame(0, flags=["ACK"]).serialize() * 50, 0.0)
    guard.feed(ping(ack=True) * 50, 0.0)
    guard.feed(DataFrame(1, flags=["END_STREAM"]).serialize() * 50, 0.0)


def test_counts_start_over_each_window():
    guard = FrameGuard(LIMITS)
    guard.feed(PREFACE, 0.0)
    for window in range(4):
        guard.feed(rst(1) * 5, window * 10.0)  # the limit, in each window
    guard.feed(rst(1) * 4, 40.0)
    guard.note_refused(40.0)  # a refused stream counts as a reset
    with pytest.raises(H2Abuse, match="reset or refused"):
        guard.feed(rst(1), 40.0)


def test_continuation_floods_and_long_header_blocks():
    guard = FrameGuard(LIMITS)
    guard.feed(PREFACE + HeadersFrame(1, data=b"x" * 10).serialize(), 1.0)
    assert guard.header_block_since == 1.0
    guard.feed(ContinuationFrame(1, data=b"x").serialize() * 2, 2.0)
    with pytest.raises(H2Abuse, match="CONTINUATION"):
        guard.feed(ContinuationFrame(1, data=b"x").serialize(), 3.0)

    guard = FrameGuard(LIMITS)
    guard.feed(PREFACE + HeadersFrame(1, data=b"x" * 60).serialize(), 1.0)
    with pytest.raises(H2Abuse, match="header block over 100 bytes"):
        guard.feed(ContinuationFrame(1, data=b"x" * 41).serialize(), 1.0)


def test_a_finished_header_block_clears_its_clock():
    guard = FrameGuard(LIMITS)
    guard.feed(PREFACE + HeadersFrame(1, data=b"x" * 60).serialize(), 1.0)
    guard.feed(ContinuationFrame(1, data=b"x" * 40, flags=["END_HEADERS"]).serialize(), 1.0)
    assert guard.header_block_since is None
    guard.feed(HeadersFrame(3, data=b"x" * 100, flags=["END_HEADERS"]).serialize(), 2.0)


def _head(headers, **kwargs):
    defaults = {
        "end_stream": True,
        "scheme": b"https",
        "client_ip": b"10.0.0.9",
        "max_header_count": 100,
    }
    return request_head(headers, **{**defaults, **kwargs})


BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":authority", b"a.test"),
    (b":path", b"/p?q=1"),
]


def test_request_head_translation():
    head = _head(
        [
            *BASE,
            (b"cookie", b"a=1"),
            (b"x-y", b"z"),
            (b"cookie", b"b=2"),
            (b"content-length", b"5"),
        ],
        end_stream=False,
    )
    assert (head.method, head.target, head.authority) == (b"POST", b"/p?q=1", b"a.test")
    assert head.scheme == b"https"  # how the client reached us, not its :scheme claim
    assert head.http_version == b"2" and head.has_body and head.content_length == 5
    assert head.headers == [(b"x-y", b"z"), (b"content-length", b"5"), (b"cookie", b"a=1; b=2")]


def test_host_stands_in_for_a_missing_authority_and_is_never_passed_on():
    no_authority = [h for h in BASE if h[0] != b":authority"]
    head = _head([*no_authority, (b"host", b"h.test")])
    assert head.authority == b"h.test" and not head.has_body
    assert _head([*BASE, (b"host", b"other")]).authority == b"a.test"
    assert all(name != b"host" for name, _ in _head([*BASE, (b"host", b"x")]).headers)


@pytest.mark.parametrize(
    "extra, status",
    [
        ([(b"content-length", b"x")], 400),
        ([(b"content-length", b"1"), (b"content-length", b"2")], 400),
        ([(f"x-{i}".encode(), b"v") for i in range(101)], 431),
    ],
)
def test_bad_request_heads(extra, status):
    with pytest.raises(ClientError) as info:
        _head([*BASE, *extra])
    assert info.value.status == status


def test_connect_and_missing_authority_are_refused():
    with pytest.raises(ClientError) as info:
        _head([(b":method", b"CONNECT"), (b":authority", b"a:443")])
    assert info.value.status == 405
    with pytest.raises(ClientError):
        _head([h for h in BASE if h[0] != b":authority"])
