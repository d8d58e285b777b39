"""Upstream trailers on real sockets: relayed to an HTTP/1.1 client that sent ``TE: trailers``
on a chunked response (fast path and h11 path), dropped otherwise; relayed to HTTP/2 clients."""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing

from tests.support.faulty_upstream import FaultyUpstream
from tests.support.h2client import H2Client
from tests.support.helpers import HOST, make_config, raw_exchange, start_proxy

RELAYED = b"0\r\ngrpc-status: 0\r\nx-checksum: c0ffee\r\n\r\n"
DROPPED = b"0\r\n\r\n"


@pytest.fixture
async def proxy_port(nursery: trio.Nursery) -> int:
    upstream = FaultyUpstream()
    port = await nursery.start(upstream.serve)
    return (await start_proxy(nursery, make_config(port))).port


# A plain GET takes the client-side fast path; a chunked upload goes through h11.
GET = b"GET /ok?trailers=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n%s\r\n"
UPLOAD = (
    b"POST /ok?trailers=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    b"Transfer-Encoding: chunked\r\n%s\r\n3\r\nabc\r\n0\r\n\r\n"
)


@pytest.mark.parametrize("request_bytes", [GET, UPLOAD], ids=["fast-path", "h11"])
@pytest.mark.parametrize(
    "te,ending",
    [
        (b"TE: trailers\r\n", RELAYED),
        (b"TE: gzip;q=0.5, Trailers\r\n", RELAYED),
        (b"", DROPPED),
        (b"TE: gzip\r\n", DROPPED),
    ],
    ids=["te-trailers", "te-list", "no-te", "te-without-trailers"],
)
async def test_http1_client_gets_trailers_only_if_it_asked(proxy_port, request_bytes, te, ending):
    with trio.fail_after(5):
        reply = await raw_exchange(proxy_port, request_bytes % te)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ntransfer-encoding: chunked\r\n" in reply.lower()
    assert reply.endswith(b"\r\n\r\n2\r\nok\r\n" + ending), reply


async def test_http10_client_gets_no_trailers(proxy_port, caplog):
    # An HTTP/1.0 response has no chunked framing: its body ends with the connection.
    request = b"GET /ok?trailers=1 HTTP/1.0\r\nHost: a\r\nTE: trailers\r\n\r\n"
    with trio.fail_after(5):
        reply = await raw_exchange(proxy_port, request)
        await trio.testing.wait_all_tasks_blocked()
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"\r\n\r\nok"), reply
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_keep_alive_goes_on_after_trailers(proxy_port):
    stream = await trio.open_tcp_stream(HOST, proxy_port)
    client = h11.Connection(h11.CLIENT)
    ends: list[list[tuple[bytes, bytes]]] = []
    with trio.fail_after(5):
        async with stream:
            for target in ("/ok?trailers=1", "/ok?trailers=1", "/ok"):
                request = h11.Request(
                    method="GET", target=target, headers=[("host", "a"), ("te", "trailers")]
                )
                await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.EndOfMessage):
                        ends.append(list(event.headers))
                        break
                client.start_next_cycle()
    trailers = [(b"grpc-status", b"0"), (b"x-checksum", b"c0ffee")]
    assert ends == [trailers, trailers, []]


async def test_http2_client_gets_trailers(proxy_port):
    async with await H2Client.connect(proxy_port) as client:
        with trio.fail_after(5):
            reply = await client.get("/ok?trailers=1")
    assert (reply.status, bytes(reply.body)) == (200, b"ok")
    assert reply.trailers == [(b"grpc-status", b"0"), (b"x-checksum", b"c0ffee")]
