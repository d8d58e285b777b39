"""uvicorn serving a Starlette app (plain routes, sse-starlette) behind the proxy."""

from __future__ import annotations

from functools import partial

import httpx
import trio

from tests.support.helpers import H11Client, make_config, start_proxy

from .checks import (
    Lane,
    assert_live,
    idle_lane,
    measure_idle_close,
    payload,
    post_roundtrip,
    read_sse,
)
from .conftest import uvicorn_argv


async def test_plain_routes_and_forwarding_headers(nursery, uvicorn_server):
    proxy = await start_proxy(nursery, make_config(uvicorn_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            response = await client.get("/")
            assert response.status_code == 200
            assert response.text == "hello from starlette\n"
            assert "1.1 pooled-proxy" in response.headers["via"]

            response = await client.get("/echo", headers={"x-forwarded-for": "10.1.2.3"})
            seen = dict(response.json()["headers"])
            assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
            assert seen["via"] == "1.1 pooled-proxy"

            await post_roundtrip(client, "/echo", payload(1 << 20))
            await post_roundtrip(client, "/echo", payload(300_000), chunked=True)
            assert (await client.get("/missing")).status_code == 404
    stats = proxy.pool().statistics()
    assert stats.opened == 1, stats  # uvicorn keeps the connection alive; the pool reuses it
    assert stats.reused == 4


async def test_sse_starlette_events_arrive_live(nursery, uvicorn_server):
    proxy = await start_proxy(nursery, make_config(uvicorn_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            events = await read_sse(client, "/sse?count=6&interval=0.15")
    assert_live(events, 6)


async def test_idle_close_without_keepalive_header_never_becomes_a_502(nursery, server_factory):
    """uvicorn closes an idle connection after --timeout-keep-alive without advertising it.

    The pool cannot retire it in advance, so this is the stale race proper: requests sent
    just before, at and just after the moment uvicorn closes must all succeed (the closed
    socket is seen at checkout, or the request is retried on a new connection).
    """
    uvicorn = server_factory(
        "uvicorn-ka1", lambda port: uvicorn_argv(port, "--timeout-keep-alive", "1")
    )
    closes_after, advertised = await measure_idle_close(uvicorn.port)
    assert advertised is None
    assert 0.7 < closes_after < 2.0, closes_after
    lanes = [
        (await start_proxy(nursery, make_config(uvicorn.port)), Lane(method, closes_after + offset))
        for method in ("GET", "POST")
        for offset in (-0.05, 0.0, 0.05)
    ]
    body = payload(50_000)
    with trio.fail_after(20):
        async with trio.open_nursery() as running:
            for proxy, lane in lanes:
                running.start_soon(
                    partial(
                        idle_lane,
                        proxy.url,
                        "/echo",
                        lane,
                        body=body if lane.method == "POST" else b"",
                    )
                )
    assert all(lane.statuses == (200, 200) for _, lane in lanes), [lane for _, lane in lanes]
    # The trap was really sprung: uvicorn closed pooled connections under the proxy, which
    # saw it at checkout ("stale") or retried the request on a fresh connection.
    caught = sum(
        proxy.pool().statistics().closed.get("stale", 0) + proxy.proxy.forwarder.stale_retries
        for proxy, _ in lanes
    )
    assert caught >= 2, [proxy.pool().statistics() for proxy, _ in lanes]


async def test_client_connection_survives_many_requests(nursery, uvicorn_server):
    proxy = await start_proxy(nursery, make_config(uvicorn_server.port))
    with trio.fail_after(15):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(50):
                reply = await client.request("GET", "/")
                assert reply.status == 200 and reply.body == b"hello from starlette\n"
    assert proxy.pool().statistics().opened == 1
