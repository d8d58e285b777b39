"""hypercorn serving the same Starlette app (plain routes, sse-starlette) behind the proxy."""

from __future__ import annotations

import httpx
import trio

from tests.support.helpers import make_config, start_proxy

from .checks import assert_live, payload, post_roundtrip, read_sse


async def test_plain_routes_post_and_reuse(nursery, hypercorn_server):
    proxy = await start_proxy(nursery, make_config(hypercorn_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            response = await client.get("/")
            assert response.status_code == 200
            assert response.text == "hello from starlette\n"
            seen = dict((await client.get("/echo")).json()["headers"])
            assert seen["via"] == "1.1 pooled-proxy"
            assert seen["x-forwarded-for"] == "127.0.0.1"
            await post_roundtrip(client, "/echo", payload(1 << 20))
            await post_roundtrip(client, "/echo", payload(200_000), chunked=True)
    stats = proxy.pool().statistics()
    assert stats.opened == 1 and stats.reused == 3, stats


async def test_sse_starlette_events_arrive_live(nursery, hypercorn_server):
    proxy = await start_proxy(nursery, make_config(hypercorn_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            events = await read_sse(client, "/sse?count=6&interval=0.15")
    assert_live(events, 6)


async def test_concurrent_requests_share_a_bounded_pool(nursery, hypercorn_server):
    proxy = await start_proxy(nursery, make_config(hypercorn_server.port, max_connections=3))
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=proxy.url) as client:

            async def worker() -> None:
                for _ in range(10):
                    await post_roundtrip(client, "/echo", payload(4096))

            async with trio.open_nursery() as workers:
                for _ in range(8):
                    workers.start_soon(worker)
    stats = proxy.pool().statistics()
    assert stats.opened <= 3 and stats.opened + stats.reused == 80, stats
