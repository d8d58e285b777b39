"""One request validation for both front ends: the same request gets the same answer over
HTTP/1.1 and HTTP/2, and a refused one never reaches the upstream.

Each case is sent as raw HTTP/1.1 bytes and as an HTTP/2 header block (h2's own outbound
checks off, as a careless client's) to a proxy in front of the demo upstream, over real
sockets. Cases that HTTP/2 itself refuses at the protocol level (upper-case names, a value
with surrounding whitespace, a Connection header, CONNECT with a :path) are not in the
table: HTTP/1.1 has no such rules, so there is no common verdict to compare."""

from __future__ import annotations

import pytest
import trio

from tests.support.h2client import H2Client, H2Reply
from tests.support.helpers import make_config, raw_exchange, start_proxy

OK = (200, None)
BAD = (400, b"http_request_error")

# name: (method, scheme, authority, path, extra fields, (status, Proxy-Status error))
CASES: dict[str, tuple[bytes, bytes, bytes, bytes, list[tuple[bytes, bytes]], tuple]] = {
    "plain": (b"GET", b"http", b"a.example", b"/", [], OK),
    "port and query": (b"GET", b"http", b"a.example:8080", b"/echo?x=%20&y", [], OK),
    "IPv6 literal": (b"GET", b"http", b"[::1]:80", b"/", [], OK),
    "https named on a cleartext port": (b"GET", b"https", b"a.example", b"/", [], OK),
    "obs-text in a value": (b"GET", b"http", b"a", b"/", [(b"x-a", b"caf\xc3\xa9")], OK),
    "inner spaces and tabs in a value": (b"GET", b"http", b"a", b"/", [(b"x-a", b"a \tb")], OK),
    "OPTIONS *": (b"OPTIONS", b"http", b"a", b"*", [], (404, b"destination_not_found")),
    "non-token method": (b"G(T", b"http", b"a", b"/", [], BAD),
    "space in the path": (b"GET", b"http", b"a", b"/a b", [], BAD),
    "DEL in the path": (b"GET", b"http", b"a", b"/a\x7f", [], BAD),
    "obs-text in the path": (b"GET", b"http", b"a", b"/caf\xc3\xa9", [], BAD),
    "path not origin-form": (b"GET", b"http", b"a", b"a/b", [], BAD),
    "* for GET": (b"GET", b"http", b"a", b"*", [], BAD),
    "non-token field name": (b"GET", b"http", b"a", b"/", [(b"x(y", b"1")], BAD),
    "0x01 in a value": (b"GET", b"http", b"a", b"/", [(b"x-a", b"a\x01b")], BAD),
    "0x7f in a value": (b"GET", b"http", b"a", b"/", [(b"x-a", b"a\x7fb")], BAD),
    "userinfo in the authority": (b"GET", b"http", b"user@evil.example", b"/", [], BAD),
    "space in the authority": (b"GET", b"http", b"a b", b"/", [], BAD),
    "empty authority": (b"GET", b"http", b"", b"/", [], BAD),
    "bad port": (b"GET", b"http", b"a:8o", b"/", [], BAD),
    "unknown scheme": (b"GET", b"evil", b"a", b"/", [], BAD),
}


def _h1_request(method, scheme, authority, path, fields) -> bytes:  # type: ignore[no-untyped-def]
    # The scheme is only named by an absolute-form target.
    target = path if scheme == b"http" else scheme + b"://" + authority + path
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: " + authority]
    lines += [name + b": " + value for name, value in fields]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _verdict(status: int, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes | None]:
    """The status, and the error type of the proxy's own answer (None: the upstream's)."""
    for name, value in headers:
        if name.lower() == b"proxy-status" and b"error=" in value:
            return status, value.split(b"error=")[1].split(b";")[0]
    return status, None


async def _over_http1(port: int, request: bytes) -> tuple[int, bytes | None]:
    answer = await raw_exchange(port, request)
    head = answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    headers = [tuple(line.split(b": ", 1)) for line in head[1:]]
    return _verdict(int(head[0].split(b" ")[1]), headers)  # type: ignore[arg-type]


async def _over_http2(
    client: H2Client, block: list[tuple[bytes, bytes]]
) -> tuple[int, bytes | None]:
    stream_id = client.conn.get_next_available_stream_id()
    reply = client.replies[stream_id] = H2Reply()
    client.conn.send_headers(stream_id, block, end_stream=True)
    await client.flush()
    await client.response(stream_id)
    assert reply.reset_code is None, reply
    return _verdict(reply.status, reply.headers)


@pytest.fixture
async def proxy_port(nursery, demo_upstream):  # type: ignore[no-untyped-def]
    upstream, port = demo_upstream
    running = await start_proxy(nursery, make_config(port))
    return running.port, upstream


async def test_both_front_ends_give_every_request_the_same_answer(proxy_port):
    port, upstream = proxy_port
    verdicts = {}
    with trio.fail_after(10):
        async with await H2Client.connect(port) as client:
            client.conn.config.validate_outbound_headers = False
            for name, (method, scheme, authority, path, fields, _) in CASES.items():
                block = [
                    (b":method", method),
                    (b":scheme", scheme),
                    (b":authority", authority),
                    (b":path", path),
                    *fields,
                ]
                verdicts[name] = (
                    await _over_http1(port, _h1_request(method, scheme, authority, path, fields)),
                    await _over_http2(client, block),
                )
    assert verdicts == {name: (case[-1], case[-1]) for name, case in CASES.items()}
    # Only the requests answered by the upstream reached it, once per protocol.
    forwarded = [case for case in CASES.values() if case[-1][1] is None]
    assert upstream.stats.requests == 2 * len(forwarded)


@pytest.mark.parametrize("version", [b"2.0", b"0.9", b"3.1"])
async def test_an_http_version_the_proxy_does_not_speak_is_505(proxy_port, version):
    port, upstream = proxy_port
    request = b"GET / HTTP/" + version + b"\r\nHost: a\r\n\r\n"
    with trio.fail_after(5):
        answer = await raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 505 ")
    assert b"proxy-status: pooled-proxy; error=http_request_error" in answer
    assert upstream.stats.requests == 0


async def test_an_empty_host_is_refused_after_an_http10_request_without_one(proxy_port):
    # A verdict depends on the request alone: an HTTP/1.0 request with no Host passes, and
    # must not make the next request's empty Host pass too.
    port, upstream = proxy_port
    with trio.fail_after(5):
        without_host = await _over_http1(port, b"GET / HTTP/1.0\r\n\r\n")
        empty_host = await _over_http1(port, _h1_request(b"GET", b"http", b"", b"/", []))
    assert (without_host, empty_host) == (OK, BAD)
    assert upstream.stats.requests == 1
