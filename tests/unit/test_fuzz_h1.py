"""Random and mutated bytes thrown at the HTTP/1.1 front end (hypothesis).

Each example runs the real connection task (``HTTP1Connection.serve``) over an in-memory
stream on trio's MockClock, in front of an in-memory upstream, and checks that the
connection task never raises, that the client always gets an answer or a close (within the
timeouts), that the upstream never sees more requests than the strict framing check accepts
from those bytes, and that nothing is left in use or open afterwards.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.http1.parse import RequestChecker, Violation
from tests.support.memory_front_end import (
    SERVER,
    exchange,
)

TEMPLATES = [
    b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /ok?size=3000 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"PUT /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"GET /ok HTTP/1.0\r\n\r\n",
    b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /ok HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET http://a/ok HTTP/1.1\r\nHost: b\r\n\r\n",
    b"HEAD /ok HTTP/1.1\r\nHost: a\r\n\r\n",
]
SNIPPETS = [
    b"\r", b"\n", b"\x00", b" ", b"\t", b":", b",", b"0", b"f", b"-", b"\r\n", b"\r\n ",
    b"\r\n\r\n", b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Content-Length: 99999\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Host: b\r\n",
    b"ffffffffffffffffff\r\n", b"0\r\n\r\n", b"GET / HTTP/1.1\r\n", b"X: " + b"a" * 3000 + b"\r\n",
]  # fmt: skip


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(TEMPLATES), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat_line"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(SNIPPETS))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        else:
            start = data.rfind(b"\r\n", 0, pos) + 2
            end = data.find(b"\r\n", pos)
            if 2 <= start < end:
                data[end + 2 : end + 2] = data[start : end + 2]
    return bytes(data)


CLIENT_BYTES = st.one_of(mutated_requests(), st.binary(max_size=300))


def _accepted_heads(data: bytes) -> int:
    """How many request heads the strict check lets through from these bytes."""
    checker = RequestChecker(
        max_head_bytes=SERVER["max_header_bytes"], max_header_count=SERVER["max_header_count"]
    )
    try:
        checker.feed(data)
    except Violation:
        pass
    return checker.heads


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=CLIENT_BYTES,
    cut_points=st.lists(st.integers(0, 400), max_size=4),
    half_close=st.booleans(),
)
@example(
    data=b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    cut_points=[],
    half_close=False,
)
@example(
    data=b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
    cut_points=[10],
    half_close=True,
)
@example(
    data=b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nhel",
    cut_points=[],
    half_close=False,
)
def test_front_end_survives_any_bytes(data: bytes, cut_points: list[int], half_close: bool) -> None:
    cuts = sorted({c for c in cut_points if 0 < c < len(data)})
    outcome = exchange(data, cuts, half_close)
    # Always an answer or a close: the connection ended (read_until_close returned) and
    # whatever came back is HTTP/1.1 responses, each proxy error with its Proxy-Status.
    reply = outcome.reply
    assert reply == b"" or reply.startswith(b"HTTP/1.1 "), reply[:80]
    for head in re.findall(rb"HTTP/1\.1 ([45]\d\d) [^\r]*\r\n((?:[^\r]+\r\n)*)\r\n", reply):
        status, fields = head
        assert b"proxy-status: pooled-proxy; error=" in fields.lower(), (status, fields)
    # Smuggled requests never reach the upstream.
    assert outcome.upstream_requests <= _accepted_heads(data)
    # Nothing leaked: no upstream connection in use; every one still open idles in the pool.
    assert outcome.in_use == 0
    assert outcome.upstream_open == outcome.idle
