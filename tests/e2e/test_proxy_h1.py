"""End-to-end HTTP/1.1 through the proxy on real sockets, against the demo upstream."""

from __future__ import annotations

import re

import h11
import httpx
import trio

from pooled_proxy.daemon.demo_upstream import DemoUpstream
from tests.support.helpers import H11Client, make_config, raw_exchange, start_proxy


async def test_get_is_forwarded_with_forwarding_headers(nursery, demo_upstream):
    _upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request(
                "GET",
                "/echo?x=1",
                headers=[
                    ("x-forwarded-for", "10.0.0.1"),
                    ("connection", "keep-alive, x-secret"),
                    ("x-secret", "hop"),
                    ("keep-alive", "timeout=5"),
                    ("te", "trailers"),
                ],
            )
    assert reply.status == 200
    seen = {k: v for k, v in reply.json()["headers"]}
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "test.local"
    assert seen["host"] == "test.local"
    assert seen["via"] == "1.1 pooled-proxy"
    for hop in ("connection", "x-secret", "keep-alive", "te"):
        assert hop not in seen
    assert reply.headers[b"via"] == b"1.1 pooled-proxy"
    assert reply.json()["path"] == "/echo?x=1"


async def test_keepalive_requests_share_bounded_upstream_connections(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, max_connections=4))
    with trio.fail_after(10):
        async with httpx.AsyncClient(
            base_url=proxy.url, limits=httpx.Limits(max_connections=16)
        ) as client:

            async def worker() -> None:
                for _ in range(10):
                    response = await client.get("/echo")
                    assert response.status_code == 200

            async with trio.open_nursery() as workers:
                for _ in range(16):
                    workers.start_soon(worker)
    assert upstream.stats.requests == 160
    assert upstream.stats.max_concurrent_connections <= 4
    assert upstream.stats.connections_opened <= 4
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.waiting == 0
    assert stats.idle == upstream.stats.connections_open


async def test_sequential_requests_reuse_one_upstream_connection(nursery, demo_upstream):
    upstream, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(20):
                assert (await client.request("GET", "/status/204")).status == 204
    assert upstream.stats.connections_opened == 1
    assert proxy.pool().statistics().reused == 19


async def test_post_body_streams_both_ways(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    body = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("POST", "/echo", body=body)
            assert reply.status == 200
            assert reply.body == body
            # The same client connection goes on working after a body.
            assert (await client.request("GET", "/status/200")).status == 200


async def test_pipelined_requests_answered_in_order(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    pipelined = (
        b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/201 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /status/202 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    with trio.fail_after(5):
        data = await raw_exchange(proxy.port, pipelined)
    statuses = re.findall(rb"HTTP/1\.1 \d{3} [A-Za-z ]+", data)
    assert statuses == [b"HTTP/1.1 200 OK", b"HTTP/1.1 201 Created", b"HTTP/1.1 202 Accepted"]
    assert data.index(b"slow done") < data.index(b"201 Created")


async def test_expect_100_continue_is_relayed_from_upstream(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            await client.send(
                h11.Request(
                    method="POST",
                    target="/echo",
                    headers=[("host", "a"), ("content-length", "5"), ("expect", "100-continue")],
                )
            )
            first = await client.next_event()
            assert isinstance(first, h11.InformationalResponse) and first.status_code == 100
            assert first.reason == b"Continue"
            await client.send(h11.Data(data=b"hello"), h11.EndOfMessage())
            reply = await client.read_reply()
    assert reply.status == 200 and reply.body == b"hello"


async def test_no_route_is_404_with_proxy_status(nursery, demo_upstream):
    _, port = demo_upstream
    config = make_config(port)
    from dataclasses import replace

    from pooled_proxy.config import RouteConfig

    config = replace(config, routes=(RouteConfig(upstream="app", host="only.example"),))
    proxy = await start_proxy(nursery, config)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/")
    assert reply.status == 404
    assert reply.headers[b"proxy-status"].startswith(b"pooled-proxy; error=destination_not_found")
    assert reply.headers[b"content-type"].startswith(b"text/plain")


async def test_refused_port_is_502(nursery):
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    proxy = await start_proxy(nursery, make_config(dead_port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/")
            assert reply.status == 502
            assert b"error=connection_refused" in reply.headers[b"proxy-status"]
            # The client connection survives an upstream failure.
            assert (await client.request("GET", "/")).status == 502
    assert proxy.pool().statistics().in_use == 0


async def test_hanging_upstream_is_504(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port, response_header_timeout=0.2))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            reply = await client.request("GET", "/slow?delay=3")
    assert reply.status == 504
    assert b"error=http_response_timeout" in reply.headers[b"proxy-status"]
    stats = proxy.pool().statistics()
    assert stats.in_use == 0 and stats.idle == 0 and stats.closed.get("error") == 1


async def test_queue_full_is_503_with_retry_after(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(
        nursery, make_config(port, max_connections=1, queue_size=1, queue_timeout=5.0)
    )
    with trio.fail_after(5):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            results: list[httpx.Response] = []

            async def slow() -> None:
                results.append(await client.get("/slow?delay=0.5"))

            async with trio.open_nursery() as group:
                group.start_soon(slow)
                group.start_soon(slow)  # waits in the queue: it gets the connection later
                await trio.sleep(0.1)
                third = await client.get("/status/200")
    assert third.status_code == 503
    assert third.headers["retry-after"] == "1"
    assert "error=connection_limit_reached" in third.headers["proxy-status"]
    assert sorted(r.status_code for r in results) == [200, 200]
    assert proxy.pool().statistics().queue_rejected == 1


async def test_readme_demo_upstream_used_by_cli_exists():
    # the demo command wires DemoUpstream behind the proxy; guard the import path it uses
    assert DemoUpstream().stats.requests == 0


async def test_chunked_request_body_is_forwarded_chunked(nursery, demo_upstream):
    # The client's chunked framing is hop-by-hop; the upstream request must be re-framed as
    # chunked, or h11 takes it for a bodiless request and refuses the first body chunk.
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            request = h11.Request(
                method="POST",
                target="/echo",
                headers=[("host", "test.local"), ("transfer-encoding", "chunked")],
            )
            await client.send(
                request, h11.Data(data=b"first,"), h11.Data(data=b"second"), h11.EndOfMessage()
            )
            reply = await client.read_reply()
    assert reply.status == 200
    assert reply.body == b"first,second"
