"""Random and mutated bytes thrown at the HTTP/1.1 front end (hypothesis).

Each example runs the real connection task (``HTTP1Connection.serve``) over an in-memory
stream on trio's MockClock, in front of an in-memory upstream, and checks that the
connection task never raises, that the client always gets an answer or a close (within the
timeouts), that the upstream never sees more requests than the strict framing check accepts
from those bytes, and that nothing is left in use or open afterwards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.http1.parse import RequestChecker, Violation
from pooled_proxy.proxy import Proxy
from pooled_proxy.server.http1 import HTTP1Connection
from tests.support.faulty_upstream import FaultyUpstream, SeenRequest, read_until_close
from tests.support.helpers import make_config

SERVER = {
    "header_timeout": 10.0,
    "keepalive_timeout": 20.0,
    "body_timeout": 15.0,
    "write_timeout": 10.0,
    "max_header_bytes": 2048,
    "max_header_count": 20,
    "max_body_bytes": 4096,
}
# The proxy must have closed the client connection by then, whatever the bytes were.
CLOSE_WITHIN = 200.0

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


_DATE = re.compile(rb"(?i)\r\ndate: [^\r]*")


@dataclass
class Outcome:
    reply: bytes
    upstream_requests: int
    in_use: int
    idle: int
    upstream_open: int
    upstream_seen: list[SeenRequest]


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


_NEW_ID = re.compile(rb"(?<=\r\nx-request-id: )[0-9a-f]{24}(?=\r\n)", re.IGNORECASE)


def _without_new_ids(reply: bytes) -> bytes:
    """The reply with the request IDs the proxy made masked: they differ between runs."""
    return _NEW_ID.sub(b"-", reply)


def _seen_without_new_id(request: SeenRequest) -> SeenRequest:
    headers = [
        (name, b"-" if name == b"x-request-id" and re.fullmatch(rb"[0-9a-f]{24}", value) else value)
        for name, value in request.headers
    ]
    return SeenRequest(request.method, request.target, headers, request.body, request.complete)


def exchange(data: bytes, cuts: list[int], half_close: bool) -> Outcome:
    """Run one connection on a fresh trio loop and MockClock; return what happened."""

    async def main() -> Outcome:
        upstream = FaultyUpstream(mode="ok")
        async with trio.open_nursery() as nursery:
            proxy = Proxy(
                make_config(1, response_header_timeout=5.0, read_timeout=5.0, server=SERVER),
                connect=upstream.connector(nursery),
            )
            client, server = trio.testing.memory_stream_pair()
            connection = HTTP1Connection(server, proxy, client_ip=b"203.0.113.7", scheme=b"http")
            served = trio.Event()

            async def serve() -> None:
                await connection.serve()  # anything it raises fails the example
                served.set()

            nursery.start_soon(serve)
            with trio.fail_after(CLOSE_WITHIN):
                try:
                    for start, end in zip([0, *cuts], [*cuts, len(data)]):
                        await client.send_all(data[start:end])
                        await trio.testing.wait_all_tasks_blocked()
                    if half_close:
                        await client.send_eof()
                except trio.BrokenResourceError:
                    pass  # the proxy closed on us mid-send: fine
                reply = await read_until_close(client)
                await served.wait()
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.forwarder.upstreams["app"].pools[0].statistics()
            outcome = Outcome(
                # The Date the proxy adds says when, which two runs need not agree on.
                _without_new_ids(_DATE.sub(b"\r\ndate: (now)", reply)),
                len(upstream.requests),
                stats.in_use,
                stats.idle,
                upstream.connections_open,
                [_seen_without_new_id(request) for request in upstream.requests],
            )
            proxy.forwarder.close()
            nursery.cancel_scope.cancel()
        return outcome

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


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
