"""gunicorn's sync worker behind the proxy: it closes every connection after one response.

The pool must never hand out such a connection again, must not count those closes as
failures of the upstream, and must keep the *client's* connection alive regardless
(``Connection: close`` is hop-by-hop).
"""

from __future__ import annotations

import httpx
import trio
import trio.testing

from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.operations import start_operated_proxy

from .checks import payload, post_roundtrip


async def test_every_request_gets_a_fresh_connection_and_the_client_keeps_its_own(
    nursery, gunicorn_server
):
    operated = await start_operated_proxy(nursery, make_config(gunicorn_server.port))
    proxy = operated.running
    with trio.fail_after(20):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(30):
                reply = await client.request("GET", "/")
                assert reply.status == 200
                assert reply.body == b"hello from gunicorn\n"
                assert b"connection" not in reply.headers  # the upstream's close stays upstream
            reply = await client.request("POST", "/echo", body=b"posted through")
            assert reply.status == 200 and reply.body == b"posted through"
        await trio.testing.wait_all_tasks_blocked()  # the proxy's release after the last byte
    stats = proxy.pool().statistics()
    assert stats.opened == 31 and stats.reused == 0, stats
    assert stats.idle == 0 and stats.in_use == 0
    assert stats.closed == {"upstream_close": 31}, stats  # a normal end, not an error
    scrape = await operated.scrape()
    closed = "pooled_proxy_upstream_connections_closed_total"
    assert scrape.value(closed, reason="upstream_close") == 31
    assert scrape.value(closed, reason="error") == 0


async def test_concurrent_load_and_bodies(nursery, gunicorn_server):
    proxy = await start_proxy(nursery, make_config(gunicorn_server.port, max_connections=4))
    statuses: list[int] = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=proxy.url) as client:

            async def worker() -> None:
                for _ in range(10):
                    statuses.append((await client.get("/")).status_code)
                    await post_roundtrip(client, "/echo", payload(100_000))

            async with trio.open_nursery() as workers:
                for _ in range(6):
                    workers.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
    assert statuses == [200] * 60
    stats = proxy.pool().statistics()
    assert stats.reused == 0 and stats.opened == 120, stats
    assert proxy.proxy.forwarder.stale_retries == 0
