"""The HTTP/1.1 codec's direct path, end to end through the front end: exactly what h11 writes.

A request whose head arrives whole in one read takes the direct path (parsed by the codec's
parser, answered without h11); the same request sent in two pieces goes through h11. Each
case here is sent both ways on fresh connections, and the bytes that come back, and
whether the connection is then kept open, must be the same.
"""

from __future__ import annotations

import re

import h11
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pooled_proxy.protocol.http1 import connection as http1
from pooled_proxy.server import http1 as front_end
from tests.support.helpers import HOST, make_config, raw_exchange, start_proxy
from tests.support.memory_front_end import exchange as fuzz_exchange
from tests.support.scripted_upstream import OK, as_h11_writes_it
from tests.support.scripted_upstream import run as run_scripted

CASES = [
    (b"GET", b"/", []),
    (b"HEAD", b"/", []),
    (b"GET", b"/events?count=2&interval=0.01", []),
    (b"HEAD", b"/events?count=1", []),
    (b"GET", b"/status/204", []),
    (b"GET", b"/status/304", []),
    (b"GET", b"/status/503", []),
    (b"GET", b"/bytes/300000", []),
    (b"DELETE", b"/echo?x=1", [(b"X-Custom", b"  spaced value ")]),
    (b"OPTIONS", b"/echo", [(b"Content-Length", b"0")]),
    (b"GET", b"/", [(b"Connection", b"close")]),
    (b"GET", b"/", [(b"Connection", b"keep-alive, Close")]),
    (b"GET", b"/", [(b"Connection", b"keep-alive")]),
    # A small body that comes whole with its head goes up with it, in one write.
    (
        b"POST",
        b"/echo",
        [(b"Content-Length", b"11"), (b"Content-Type", b"text/plain")],
        b"hello world",
    ),
    (b"PUT", b"/echo?x=1", [(b"Content-Length", b"3"), (b"Connection", b"close")], b"abc"),
]


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: example.test"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def exchange(port: int, case: tuple, *, split: bool) -> tuple[bytes, bool]:
    """The raw response to ``case``, and whether the connection then serves another request."""
    method, target, headers, *rest = case
    body = rest[0] if rest else b""
    data = request_bytes(method, target, headers) + body
    client = h11.Connection(h11.CLIENT)
    tracked = [(name, value.strip()) for name, value in headers]
    client.send(h11.Request(method=method, target=target, headers=[(b"host", b"x"), *tracked]))
    if body:
        client.send(h11.Data(data=body))
    client.send(h11.EndOfMessage())
    raw = b""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        if split:  # two reads: the head is not whole in the first, so h11 takes it
            await stream.send_all(data[:7])
            await trio.sleep(0.02)
            await stream.send_all(data[7:])
        else:
            await stream.send_all(data)
        while client.their_state is not h11.DONE and client.their_state is not h11.MUST_CLOSE:
            event = client.next_event()
            if event is h11.NEED_DATA:
                chunk = await stream.receive_some(65536)
                assert chunk, raw
                raw += chunk
                client.receive_data(chunk)
        await stream.send_all(request_bytes(b"GET", b"/status/200", []))
        try:
            kept_open = (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
        except trio.BrokenResourceError:
            kept_open = False
    # What differs from one response to the next: the date, an event's time, chunk sizes.
    raw = re.sub(rb"date: [^\r]*", b"date: -", raw)
    raw = re.sub(rb"(x-request-id\W+)[0-9a-f]{24}", rb"\1-", raw)  # new for every request
    raw = re.sub(rb'"t": [0-9.]+', b'"t": -', raw)
    return re.sub(rb"(?<=\n)[0-9a-f]{1,4}\r\n", b"N\r\n", raw), kept_open


class _Watched:
    """The front end's codec connection, seen from the front end: every request it hands over
    and whether it came the direct way. (The codec's own calls stay inside it, compiled or not:
    only what the front end asks goes through here.)"""

    def __init__(self, connection: http1.ServerConnection, taken: list[bytes]) -> None:
        self._connection = connection
        self._taken = taken

    def __getattr__(self, name: str) -> object:
        return getattr(self._connection, name)

    def next_event(self) -> http1.ServerEvent:
        event = self._connection.next_event()
        if isinstance(event, http1.Request) and self._connection.direct:
            self._taken.append(event.target)
        return event


@pytest.fixture
def fast_requests(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Requests the front end took on the fast path (so that each case really compares both)."""
    taken: list[bytes] = []

    def watched(**limits: int) -> _Watched:
        return _Watched(http1.ServerConnection(**limits), taken)

    monkeypatch.setattr(front_end, "ServerConnection", watched)
    return taken


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: b" ".join([c[0], c[1], *(value for _, value in c[2])]).decode()
)
async def test_fast_path_writes_what_h11_writes(nursery, demo_upstream, fast_requests, case):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(10):
        fast = await exchange(proxy.port, case, split=False)
        assert fast_requests[:1] == [case[1]]
        fast_requests.clear()
        slow = await exchange(proxy.port, case, split=True)
        assert case[1] not in fast_requests
    assert fast == slow
    closes = b"close" in b"".join(value.lower() for _, value in case[2])
    assert fast[1] is not closes
    assert (b"\r\nConnection: close\r\n" in fast[0]) is closes


async def test_fast_path_error_answer_matches_h11(nursery, fast_requests):
    # An upstream that refuses connections: the proxy's own 502 answer, both ways.
    with trio.socket.socket() as sock:
        await sock.bind((HOST, 0))
        dead_port = sock.getsockname()[1]
    proxy = await start_proxy(nursery, make_config(dead_port))
    case = (b"GET", b"/nowhere", [])
    with trio.fail_after(10):
        fast = await exchange(proxy.port, case, split=False)
        slow = await exchange(proxy.port, case, split=True)
    assert fast_requests.count(b"/nowhere") == 1 and fast_requests[0] == b"/nowhere"
    assert fast[0].startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"proxy-status: pooled-proxy; error=connection_refused" in fast[0]
    assert fast == slow


async def read_until_close(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_fast_path_keeps_the_request_limit(nursery, demo_upstream, fast_requests):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, server={"max_requests_per_connection": 2}))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, proxy.port)
        async with stream:
            for _ in range(2):
                await stream.send_all(request_bytes(b"GET", b"/status/200", []))
                await trio.sleep(0.05)
            answers = await read_until_close(stream)
    heads = re.findall(rb"HTTP/1\.1 200 OK\r\n(?:[^\r]+\r\n)*\r\n", answers)
    assert len(heads) == 2 and fast_requests == [b"/status/200"] * 2
    assert b"Connection: close" not in heads[0] and b"\r\nConnection: close\r\n" in heads[1]


async def test_requests_behind_a_fast_one_are_answered_in_order(
    nursery, demo_upstream, fast_requests
):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    second = request_bytes(b"GET", b"/status/202", [])
    last = request_bytes(b"GET", b"/status/203", [(b"Connection", b"close")])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, proxy.port)
        async with stream:
            # A whole head with part of the next one behind it: the first goes fast, and
            # the rest waits in h11 for the end of its head.
            await stream.send_all(request_bytes(b"GET", b"/slow?delay=0.2", []) + second[:9])
            await trio.sleep(0.05)
            await stream.send_all(second[9:])
            await trio.sleep(0.05)
            # Sent while the first is still being answered: read by the client watch.
            await stream.send_all(last)
            answers = await read_until_close(stream)
    assert re.findall(rb"HTTP/1\.1 (\d+) ", answers) == [b"200", b"202", b"203"]
    assert fast_requests[0] == b"/slow?delay=0.2" and b"/status/202" not in fast_requests


async def test_a_target_h11_refuses_is_still_refused(nursery, demo_upstream, fast_requests):
    # The framing checks let obs-text through in a target; h11 does not, and neither does
    # the fast path: the answer is h11's 400, not a request sent on upstream.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        answer = await raw_exchange(proxy.port, b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and fast_requests == []


async def test_a_checked_request_goes_upstream_as_h11_writes_it(nursery):
    # A fast client request is written upstream without a second validation; what arrives
    # must still be byte for byte what h11 would have written, odd but valid values included.
    upstream, proxy = await run_scripted(nursery, {})
    request = (
        b"GET /ok?a=%20b HTTP/1.1\r\nHost: example.test:8080\r\nX-Tabs:\tin\t side \r\n"
        b"X-Obs: caf\xc3\xa9\r\nX-Forwarded-For: 10.0.0.1\r\nVia: 1.0 edge\r\nAccept: */*\r\n"
        b"X-Request-ID: the-same-twice\r\n\r\n"
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(HOST, proxy.port)
        async with stream:
            for _ in range(2):
                await stream.send_all(request)
                assert (await stream.receive_some(65536)).endswith(b"\r\n\r\nok")
    heads = upstream.requests[0]
    assert len(heads) == 2 and heads[0] == heads[1] == as_h11_writes_it(heads[0])
    assert b"\r\nx-tabs: in\t side\r\n" in heads[0]
    assert b"\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n" in heads[0]


# -- the fast path against h11 on generated requests -------------------------------------------

_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=8)
_VALUE = st.binary(max_size=12).map(
    lambda raw: bytes(b if 0x20 <= b < 0x7F or b >= 0x80 or b == 0x09 else 0x61 for b in raw)
)
_FIELDS = st.one_of(
    st.tuples(_TOKEN.map(str.encode), _VALUE),
    st.sampled_from(
        [
            (b"Connection", b"close"),
            (b"Connection", b"keep-alive"),
            (b"connection", b"TE, close"),
            (b"Content-Length", b"0"),
            (b"Content-Length", b"3"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Expect", b"100-continue"),
            (b"Upgrade", b"websocket"),
            (b"TE", b"trailers"),
            (b"X-Forwarded-For", b"10.1.2.3"),
            (b"Via", b"1.0 edge"),
            (b"Host", b"other"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Cookie", b"a=b; c=d"),
            (b"X-Obs", b"caf\xc3\xa9"),
        ]
    ),
)


@st.composite
def plausible_requests(draw: st.DrawFn) -> bytes:
    """Requests a real client might send, on and off the fast path (mostly valid ones)."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"POST", b"PROPFIND"]))
    query = draw(st.sampled_from([b"", b"?size=0", b"?size=5000", b"?chunked=1", b"?x=%20y&z"]))
    target = draw(st.sampled_from([b"/ok", b"http://a/ok", b"/ok/caf\xc3\xa9"])) + query
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.1", b"1.0"]))
    fields = [(b"Host", b"a")] if draw(st.booleans()) or version == b"1.0" else []
    fields += draw(st.lists(_FIELDS, max_size=5))
    head = b"%s %s HTTP/%s\r\n" % (method, target, version)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    body = b""
    if (b"Content-Length", b"3") in fields:
        body = b"abc"
    elif (b"Transfer-Encoding", b"chunked") in fields:
        body = b"3\r\nabc\r\n0\r\n\r\n"
    return head + b"\r\n" + body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=plausible_requests(), repeat=st.integers(1, 2))
@example(data=b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Close\r\n\r\n", repeat=1)
@example(data=b"HEAD /ok?chunked=1 HTTP/1.1\r\nHost: a\r\n\r\n", repeat=1)
@example(data=b"DELETE /ok?size=5000 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", repeat=2)
@example(data=b"GET /ok?chunked=1 HTTP/1.1\r\nHost: a\r\nX-A: \tb c\t\r\n\r\n", repeat=2)
def test_a_request_whole_or_in_pieces_gets_the_same_answer(data: bytes, repeat: int) -> None:
    # Whole, each head arrives in one read and may take the fast path; cut after its third
    # byte, it cannot, and h11 reads it. The client and the upstream must see the same.
    whole = fuzz_exchange(data * repeat, [], False)
    cuts = [i * len(data) + 3 for i in range(repeat)]
    pieces = fuzz_exchange(data * repeat, cuts, False)
    assert whole.reply == pieces.reply
    assert whole.upstream_seen == pieces.upstream_seen


async def test_a_small_body_goes_up_with_its_head_and_falls_back_with_it(nursery, fast_requests):
    # A POST whose body came whole with its head is written upstream in one piece, byte for
    # byte as h11 writes it; when the response is one h11 must read (1xx, chunked), the
    # request is replayed into h11 with its body, and the connection stays usable.
    upstream, proxy = await run_scripted(
        nursery,
        {
            "/hint": [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", OK],
            "/chunked": [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            ],
        },
    )
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(HOST, proxy.port)
        async with stream:
            for path in (b"/ok", b"/hint", b"/chunked", b"/ok"):
                await stream.send_all(
                    request_bytes(b"POST", path, [(b"Content-Length", b"5")]) + b"hello"
                )
                received = b""
                while not received.endswith(b"ok") and not received.endswith(b"0\r\n\r\n"):
                    received += await stream.receive_some(65536)
                assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert fast_requests == [b"/ok", b"/hint", b"/chunked", b"/ok"]
    heads = upstream.requests
    assert len(heads) == 1 and len(heads[0]) == 4  # one upstream connection for all four
    for raw in heads[0]:
        head, _, body = raw.partition(b"\r\n\r\n")
        assert body == b"hello"
        assert head + b"\r\n\r\n" == as_h11_writes_it(head + b"\r\n\r\n")
