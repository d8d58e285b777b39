"""Several servers behind one upstream: round_robin, least_conn, one pool per server."""

from __future__ import annotations

import httpx
import trio

from pooled_proxy.daemon.demo_upstream import DemoUpstream
from tests.support.helpers import make_config, start_proxy


async def _two_upstreams(nursery: trio.Nursery) -> tuple[list[DemoUpstream], list[int]]:
    upstreams = [DemoUpstream(), DemoUpstream()]
    ports = [await nursery.start(u.serve, "127.0.0.1", 0) for u in upstreams]
    return upstreams, ports


async def test_round_robin_alternates_between_servers(nursery):
    upstreams, ports = await _two_upstreams(nursery)
    proxy = await start_proxy(nursery, make_config(*ports))
    with trio.fail_after(5):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(10):
                assert (await client.get("/status/200")).status_code == 200
    assert [u.stats.requests for u in upstreams] == [5, 5]
    # One pool per server, each reusing its own single connection.
    assert [u.stats.connections_opened for u in upstreams] == [1, 1]


async def test_least_conn_avoids_the_busy_server(nursery):
    upstreams, ports = await _two_upstreams(nursery)
    proxy = await start_proxy(nursery, make_config(*ports, balance="least_conn"))
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=proxy.url) as client, trio.open_nursery() as group:
            group.start_soon(client.get, "/slow?delay=2")  # pins one server
            # Wait until the slow request holds a connection on one of the servers.
            while sum(u.stats.requests for u in upstreams) < 1:
                await trio.sleep(0.01)
            busy = 0 if upstreams[0].stats.requests == 1 else 1
            for _ in range(6):
                assert (await client.get("/status/200")).status_code == 200
            assert upstreams[busy].stats.requests == 1
            assert upstreams[1 - busy].stats.requests == 6
