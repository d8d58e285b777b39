"""aiohttp's web server behind the proxy: chunked echo both ways, a streamed body."""

from __future__ import annotations

import httpx
import trio

from tests.support.helpers import make_config, start_proxy

from .checks import assert_live, payload, post_roundtrip, read_lines


async def test_get_and_streaming_echo(nursery, aiohttp_server):
    proxy = await start_proxy(nursery, make_config(aiohttp_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            response = await client.get("/")
            assert response.status_code == 200
            assert response.text == "hello from aiohttp\n"
            assert "aiohttp" in response.headers["server"]
            # aiohttp answers chunked: the proxy re-frames, and the body is intact.
            await post_roundtrip(client, "/echo", payload(1 << 20))
            await post_roundtrip(client, "/echo", payload(500_000), chunked=True)
            await post_roundtrip(client, "/echo", b"x")
    stats = proxy.pool().statistics()
    assert stats.opened == 1 and stats.reused == 3, stats


async def test_streamed_body_arrives_live(nursery, aiohttp_server):
    proxy = await start_proxy(nursery, make_config(aiohttp_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            lines = await read_lines(client, "/stream?count=6&interval=0.15")
    assert_live(lines, 6)
