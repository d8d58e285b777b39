"""nginx as an upstream: static files (sendfile), WebDAV PUT, its keep-alive limits.

nginx adds ``X-Connection`` ($connection) and ``X-Connection-Requests`` to every response
(see conftest), so the tests see connection reuse from the upstream's side too.
"""

from __future__ import annotations

import httpx
import trio
import trio.testing

from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.operations import start_operated_proxy

from .checks import payload


async def test_static_file_and_reuse_seen_by_nginx(nursery, nginx_server):
    proxy = await start_proxy(nursery, make_config(nginx_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            hello = await client.get("/hello")
            assert hello.status_code == 200 and hello.text == "hello from nginx\n"
            assert hello.headers["server"].startswith("nginx")
            big = await client.get("/big.bin")
            assert big.status_code == 200
            assert big.content == bytes(range(256)) * 16384
            again = await client.get("/hello")
            missing = await client.get("/nothing-here")
    assert missing.status_code == 404
    # nginx's own view: one connection, its 1st, 2nd, 3rd and 4th request.
    assert (
        hello.headers["x-connection"]
        == big.headers["x-connection"]
        == missing.headers["x-connection"]
    )
    assert [r.headers["x-connection-requests"] for r in (hello, big, again, missing)] == [
        "1",
        "2",
        "3",
        "4",
    ]
    # nginx advertises Keep-Alive: timeout=30; that is about our hop, not the client's.
    assert "keep-alive" not in hello.headers


async def test_put_body_then_get_it_back(nursery, nginx_server):
    proxy = await start_proxy(nursery, make_config(nginx_server.port))
    body = payload(3 << 20)
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            put = await client.put("/dav/upload.bin", content=body)
            assert put.status_code in (201, 204), put.text

            async def pieces():  # type: ignore[no-untyped-def]
                for start in range(0, len(body), 65536):
                    yield body[start : start + 65536]

            # chunked upload: nginx needs the proxy to re-frame it as chunked
            put = await client.put("/dav/chunked.bin", content=pieces())
            assert put.status_code in (201, 204), put.text
            for name in ("upload.bin", "chunked.bin"):
                got = await client.get(f"/dav/{name}")
                assert got.status_code == 200 and got.content == body


async def test_connection_close_after_keepalive_requests(nursery, nginx_server):
    """``keepalive_requests 3``: nginx closes every third request's connection; no error."""
    proxy = await start_proxy(nursery, make_config(nginx_server.port))
    seen: list[tuple[str, str]] = []
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(9):
                response = await client.get("/few-requests/")
                assert response.status_code == 200 and response.text == "few requests\n"
                seen.append(
                    (response.headers["x-connection"], response.headers["x-connection-requests"])
                )
        await trio.testing.wait_all_tasks_blocked()
    assert [requests for _, requests in seen] == ["1", "2", "3"] * 3
    assert len({connection for connection, _ in seen}) == 3
    stats = proxy.pool().statistics()
    assert stats.opened == 3 and stats.reused == 6, stats
    assert stats.closed == {"upstream_close": 3}, stats  # normal ends, not errors
    assert proxy.proxy.forwarder.stale_retries == 0


async def test_advertised_short_keepalive_retires_the_connection_first(nursery, nginx_server):
    """``keepalive_timeout 2s 2s``: the pool retires the connection 1 s before nginx would."""
    operated = await start_operated_proxy(nursery, make_config(nginx_server.port))
    proxy = operated.running
    with trio.fail_after(15):
        async with await H11Client.connect(proxy.port) as client:
            first = await client.request("GET", "/short-keepalive/")
            soon = await client.request("GET", "/short-keepalive/")
            await trio.sleep(1.3)  # past our retirement (1 s), before nginx's close (2 s)
            later = await client.request("GET", "/short-keepalive/")
    assert [r.status for r in (first, soon, later)] == [200, 200, 200]
    assert first.headers[b"x-connection"] == soon.headers[b"x-connection"]
    assert later.headers[b"x-connection"] != first.headers[b"x-connection"]
    stats = proxy.pool().statistics()
    assert stats.closed.get("keepalive_timeout") == 1, stats
    assert "stale" not in stats.closed and proxy.proxy.forwarder.stale_retries == 0
    scrape = await operated.scrape()
    closed = "pooled_proxy_upstream_connections_closed_total"
    assert scrape.value(closed, reason="keepalive_timeout") == 1
    assert scrape.value(closed, reason="stale") == 0
