"""httpx in front of the proxy (demo upstream behind it): HTTP/1.1 here, h2 once served."""

from __future__ import annotations

import httpx
import trio

from tests.support.helpers import make_config, start_proxy

from .checks import assert_live, payload, post_roundtrip, read_sse


async def test_http11_download_upload_and_sse(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_proxy(nursery, make_config(port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url, http1=True, http2=False) as client:
            response = await client.get("/bytes/3000000")
            assert response.http_version == "HTTP/1.1"
            assert response.content == (bytes(range(256)) * 11719)[:3000000]
            await post_roundtrip(client, "/echo", payload(1 << 20), chunked=True)
            events = await read_sse(client, "/events?count=5&interval=0.15")
    assert_live(events, 5)
