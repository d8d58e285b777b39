"""Node.js's http server behind the proxy, and its keep-alive timeout: the classic stale trap.

Node advertises ``Keep-Alive: timeout=N`` (N = keepAliveTimeout in whole seconds) and closes
a connection left idle. A proxy that reuses a pooled connection just as Node closes it
sends a request into a dead socket. The pool retires connections to such a server
``KEEPALIVE_SAFETY_MARGIN`` before the advertised N, so the race is avoided, not retried.

First the real close is measured on a direct connection (Node 20.20 closes one second
*after* what it advertises); then requests, GET and POST, each after an idle gap just
before the pool's retirement moment and just before, at and just after Node's real close.
Each gap runs in its own lane (its own proxy, so its own pool) and the lanes run at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio

from pooled_proxy.upstream.connection import KEEPALIVE_SAFETY_MARGIN
from tests.support.helpers import make_config, start_proxy
from tests.support.operations import OperatedProxy, start_operated_proxy

from .checks import (
    Lane,
    assert_live,
    idle_lane,
    measure_idle_close,
    payload,
    post_roundtrip,
    read_sse,
)
from .conftest import ServerFactory, node_argv


@dataclass(frozen=True)
class Measured:
    advertised: float  # the N of Keep-Alive: timeout=N
    closes_after: float  # when Node really closed an idle connection, measured


async def measure(port: int) -> Measured:
    closes_after, header = await measure_idle_close(port)
    assert header is not None, "Node did not advertise Keep-Alive"
    match = re.fullmatch(rb"timeout=(\d+)", header)
    assert match, header
    advertised = float(match.group(1))
    # Node never closes before what it advertised (else no client could trust the header).
    assert advertised - 0.05 <= closes_after <= advertised + 1.5, (advertised, closes_after)
    return Measured(advertised, closes_after)


async def run_keepalive_sweep(
    nursery: trio.Nursery, port: int, offsets: tuple[float, ...]
) -> Measured:
    measured = await measure(port)
    retire_at = measured.advertised - KEEPALIVE_SAFETY_MARGIN
    # 0.5 s short of retirement: still reused even when a loaded machine adds latency
    gaps = [retire_at - 0.5, *(measured.closes_after + offset for offset in offsets)]
    lanes: list[tuple[OperatedProxy, Lane]] = [
        (await start_operated_proxy(nursery, make_config(port)), Lane(method, gap))
        for method in ("GET", "POST")
        for gap in gaps
    ]
    body = payload(64_000)
    with trio.fail_after(max(gaps) + 15):
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

    assert [lane.statuses for _, lane in lanes] == [(200, 200)] * len(lanes), lanes  # zero 502s
    # Every pool at once, before the scrapes below take their time (a second connection
    # left idle would meanwhile be retired too).
    snapshots = [operated.running.pool().statistics() for operated, _ in lanes]
    for (operated, lane), stats in zip(lanes, snapshots):
        scrape = await operated.scrape()
        closed = "pooled_proxy_upstream_connections_closed_total"
        if lane.gap < retire_at:
            # Still fresh: reused, and Node had not closed it.
            assert (stats.opened, stats.reused) == (1, 1), (lane, stats)
        else:
            # Retired by the pool for the advertised timeout, before Node closed it: the
            # second request went on a new connection, and nothing was ever found stale.
            assert stats.closed.get("keepalive_timeout") == 1, (lane, stats)
            assert scrape.value(closed, reason="keepalive_timeout") >= 1  # on /metrics too
            assert (stats.opened, stats.reused) == (2, 0), (lane, stats)
        assert "stale" not in stats.closed, (lane, stats)
        assert scrape.value(closed, reason="stale") == 0
        assert operated.running.proxy.forwarder.stale_retries == 0, lane
    return measured


async def test_keepalive_trap_short_timeout(nursery, server_factory: ServerFactory):
    """keepAliveTimeout = 2 s: Node advertises timeout=2; the pool retires at 1 s."""
    node = server_factory("node-ka2", lambda port: node_argv(port, 2000))
    measured = await run_keepalive_sweep(nursery, node.port, (-0.1, 0.0, 0.1))
    assert measured.advertised == 2


@pytest.mark.slow
async def test_keepalive_trap_default_timeout(nursery, node_server):
    """Node's default keepAliveTimeout (5 s): gaps before/at/after its real close, measured."""
    measured = await run_keepalive_sweep(nursery, node_server.port, (-0.25, -0.1, 0.0, 0.1, 0.25))
    assert measured.advertised == 5


async def test_routes_sse_and_header_rewriting(nursery, node_server):
    proxy = await start_proxy(nursery, make_config(node_server.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            response = await client.get("/")
            assert response.status_code == 200
            assert response.text.startswith("hello from node v")
            # Keep-Alive is hop-by-hop: it describes Node's connection, not the client's.
            assert "keep-alive" not in response.headers
            seen = (await client.get("/echo", headers={"connection": "keep-alive, x-hop"})).json()
            assert seen["headers"]["via"] == "1.1 pooled-proxy"
            assert "x-hop" not in seen["headers"]
            await post_roundtrip(client, "/echo", payload(1 << 20))
            await post_roundtrip(client, "/echo", payload(100_000), chunked=True)
            events = await read_sse(client, "/sse?count=6&interval=150")
    assert_live(events, 6)
    assert proxy.pool().statistics().opened == 1


async def test_keepalive_clock_starts_when_the_response_ends(
    nursery, server_factory: ServerFactory
):
    """Node starts its keep-alive timer when a response *ends*. A response that streamed
    longer than the advertised timeout must not get its connection retired on return."""
    node = server_factory("node-ka2-long", lambda port: node_argv(port, 2000))
    proxy = await start_proxy(nursery, make_config(node.port))
    with trio.fail_after(15):
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            events = await read_sse(client, "/sse?count=4&interval=600")  # 1.8 s > 2 s - 1 s
            assert len(events) == 4
            assert (await client.get("/")).status_code == 200
    stats = proxy.pool().statistics()
    assert (stats.opened, stats.reused) == (1, 1), stats
    assert "keepalive_timeout" not in stats.closed, stats
