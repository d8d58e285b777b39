"""The upstream side's HTTP/1.1 direct path (``protocol/http1``'s client side), end to end.

A scripted upstream on a real socket answers each request with bytes written by hand, in
pieces a moment apart so the proxy reads them in several reads, and records every request
head per TCP connection. What is checked is what h11 would have decided: the framing of
each response (a wrong one hangs or eats the next response), which connections are reused
(one upstream connection for several requests) and which are not (a new connection), and
that the request bytes are exactly what h11 writes.
"""

from __future__ import annotations

import h11
import pytest
import trio
from hypothesis import example, given
from hypothesis import strategies as st

from pooled_proxy._h11 import h11 as proxy_h11
from pooled_proxy.protocol.http1.write import direct_request
from tests.support.faulty_upstream import SMUGGLED_RESPONSE, wait_until
from tests.support.helpers import H11Client
from tests.support.scripted_upstream import CLOSE, OK, as_h11_writes_it, run


async def test_response_split_over_reads_then_the_next_request_reuses_the_connection(nursery):
    upstream, proxy = await run(
        nursery,
        {
            "/split": [
                b"HTTP/1.1 200 OK\r\nContent-Le",
                b"ngth: 10\r\nX-A:  spaced \t\r\n\r\nabc",
                b"defg",
                b"hij",
            ],
        },
    )
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/split?q=1", headers=[("x-b", "one  two")])
            assert (reply.status, reply.body, reply.headers[b"x-a"]) == (
                200,
                b"abcdefghij",
                b"spaced",
            )
            assert (await client.request("GET", "/ok")).body == b"ok"
            assert (await client.request("GET", "/split")).body == b"abcdefghij"
    assert [len(heads) for heads in upstream.requests] == [3]
    first = upstream.requests[0][0]
    assert first.startswith(b"GET /split?q=1 HTTP/1.1\r\nhost: test.local\r\n")
    assert b"\r\nx-b: one  two\r\n" in first
    for raw in upstream.requests[0]:
        assert raw == as_h11_writes_it(raw)


@pytest.mark.parametrize(
    "method, response",
    [
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: "x"\r\n\r\n'),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
async def test_bodiless_response_ends_at_its_head_and_the_connection_is_reused(
    nursery, method, response
):
    upstream, proxy = await run(nursery, {"/none": [response]})
    status = int(response.split(b" ")[1])
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request(method, "/none")
            assert (reply.status, reply.body) == (status, b"")
            assert (await client.request("GET", "/ok")).body == b"ok"
    assert [len(heads) for heads in upstream.requests] == [2]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HTTP/1.1 204 No Content\r\n\r\n" + SMUGGLED_RESPONSE],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", b"de" + SMUGGLED_RESPONSE],
    ],
    ids=["behind-a-204", "behind-a-split-body"],
)
async def test_bytes_behind_a_response_are_never_served(nursery, pieces):
    upstream, proxy = await run(nursery, {"/extra": pieces})
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            first = await client.request("GET", "/extra")
            assert first.body in (b"", b"abcde")
            second = await client.request("GET", "/ok")
            assert second.body == b"ok" and b"x-smuggled" not in second.headers
        await wait_until(lambda: upstream.ended_by_proxy == [0])
    assert [len(heads) for heads in upstream.requests] == [1, 1]


@pytest.mark.parametrize(
    "response, reason",
    [
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, CLOSE\r\nContent-Length: 2\r\n\r\nok",
            "upstream_close",
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "upstream_close"),
        # timeout=1 minus the one-second safety margin: retired as soon as it is back
        (
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok",
            "keepalive_timeout",
        ),
    ],
    ids=["connection-close", "http-1.0", "keep-alive-timeout"],
)
async def test_upstream_that_ends_the_connection_is_not_reused(nursery, response, reason):
    upstream, proxy = await run(nursery, {"/last": [response]})
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/last")).body == b"ok"
            await wait_until(lambda: upstream.ended_by_proxy == [0])
            assert (await client.request("GET", "/ok")).body == b"ok"
    assert [len(heads) for heads in upstream.requests] == [1, 1]
    assert proxy.pool().statistics().closed == {reason: 1}


async def test_responses_h11_reads_then_fast_ones_share_one_connection(nursery):
    upstream, proxy = await run(
        nursery,
        {
            "/early": [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", OK],
            "/early-glued": [b"HTTP/1.1 103 Early Hints\r\n\r\n" + OK],
            "/chunked": [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                b"2\r\nde\r\n0\r\n\r\n",
            ],
            "/until-close": [b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close", CLOSE],
        },
    )
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for target, body in [
                ("/early", b"ok"),
                ("/ok", b"ok"),
                ("/early-glued", b"ok"),
                ("/chunked", b"abcde"),
                ("/ok", b"ok"),
                ("/until-close", b"until close"),
                ("/ok", b"ok"),
                ("/ok", b"ok"),
            ]:
                reply = await client.request("GET", target)
                assert (reply.status, reply.body) == (200, body), target
    assert [len(heads) for heads in upstream.requests] == [6, 2]


async def test_upstream_closing_mid_body_cuts_the_response(nursery):
    upstream, proxy = await run(
        nursery,
        {
            "/cut": [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd", CLOSE],
        },
    )
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            with pytest.raises(h11.RemoteProtocolError):  # the client connection is cut
                await client.request("GET", "/cut")
        async with await H11Client.connect(proxy.port) as client:
            assert (await client.request("GET", "/ok")).body == b"ok"
    assert [len(heads) for heads in upstream.requests] == [1, 1]
    assert proxy.pool().statistics().closed == {"error": 1}


# Header names and values from HTTP/2 clients may be anything the h2 library lets through.
_names = st.one_of(
    st.sampled_from(
        [
            b"accept",
            b"x-a",
            b"Host",
            b"host",
            b"connection",
            b"Content-Length",
            b"transfer-encoding",
            b"upgrade",
            b"expect",
            b"te",
        ]
    ),
    st.binary(max_size=6),
)
_values = st.one_of(
    st.sampled_from([b"", b"a b", b"a  b", b" a", b"a\t", b"\xff", b"close"]), st.binary(max_size=6)
)


@given(
    method=st.sampled_from([b"GET", b"HEAD", b"CONNECT", b"G(T", b""]),
    target=st.one_of(
        st.sampled_from([b"/", b"/a?b=c", b"*", b"/\xff", b"/ a"]), st.binary(max_size=4)
    ),
    host=st.one_of(st.just(b"example.com"), _values),
    headers=st.lists(st.tuples(_names, _values), max_size=4),
)
@example(method=b"GET", target=b"/", host=b"example.com", headers=[(b"x-a", b"a ")])
@example(method=b"GET", target=b"/", host=b"example.com", headers=[(b"x-a", b"a:  b")])
def test_a_fast_request_is_byte_for_byte_what_h11_sends(method, target, host, headers):
    """Whatever the fast path writes, h11 accepts and writes the same bytes (the fallback
    keeps h11's refusals: the fast path only ever declines)."""
    all_headers = [(b"host", host), *headers]
    fast = direct_request(method, target, all_headers)
    if fast is None:
        return
    connection = proxy_h11.Connection(proxy_h11.CLIENT)
    data = connection.send(proxy_h11.Request(method=method, target=target, headers=all_headers))
    data += connection.send(proxy_h11.EndOfMessage())
    assert fast == data
    assert connection.our_state is proxy_h11.DONE  # keep-alive, no protocol switch proposed
    connection.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    connection.next_event(), connection.next_event()
    assert connection.their_state is proxy_h11.DONE
