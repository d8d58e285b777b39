"""Passive health: a server that fails ``max_fails`` times within ``fail_window`` is skipped
for ``fail_timeout`` when its upstream has more than one server. Failures are what the
client would see as the server's fault: refused connects, resets, invalid responses and
timeouts. MockClock over in-memory upstreams, plus one run on real sockets."""

from __future__ import annotations

import re

import pytest
import trio

from pooled_proxy.config import ServerAddress
from pooled_proxy.proxy import Proxy
from pooled_proxy.upstream.connection import UpstreamConnection
from tests.support.faulty_upstream import (
    FaultyUpstream,
    memory_client,
    read_until_close,
    refused_port,
)
from tests.support.helpers import H11Client, make_config, start_proxy

HEALTH = {"max_fails": 2, "fail_window": 10.0, "fail_timeout": 30.0, "response_header_timeout": 5.0}


class TwoServers:
    """Server A (port 1) misbehaves as told; server B (port 2) is healthy."""

    def __init__(self, nursery: trio.Nursery, bad_mode: str) -> None:
        self.a = FaultyUpstream(mode=bad_mode)
        self.b = FaultyUpstream(mode="ok")
        self._connectors = {1: self.a.connector(nursery), 2: self.b.connector(nursery)}

    async def connect(self, server: ServerAddress) -> UpstreamConnection:
        return await self._connectors[server.port](server)


async def get(nursery: trio.Nursery, proxy: Proxy) -> int:
    client = memory_client(nursery, proxy)
    await client.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reply = await read_until_close(client)
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert match, reply
    return int(match.group(1))


def make_proxy(servers: TwoServers, **upstream: float) -> Proxy:
    return Proxy(make_config(1, 2, **{**HEALTH, **upstream}), connect=servers.connect)


async def test_refusing_server_is_skipped_then_tried_again(nursery, autojump_clock):
    servers = TwoServers(nursery, "refuse")
    proxy = make_proxy(servers)
    with trio.fail_after(300):
        # A refused connect is retried on the other server: the client never notices.
        assert [await get(nursery, proxy) for _ in range(6)] == [200] * 6
        assert servers.a.connect_attempts == 2  # then A was down: not even tried
        await trio.sleep(29.0)
        await get(nursery, proxy)
        await get(nursery, proxy)
        assert servers.a.connect_attempts == 2
        await trio.sleep(1.5)  # fail_timeout over: A is back in the rotation
        assert await get(nursery, proxy) == 200
        assert servers.a.connect_attempts == 3


@pytest.mark.parametrize(
    "mode,status",
    [("garbage", 502), ("reset-mid-head", 502), ("hang", 504), ("bad-response", 502)],
)
async def test_server_answering_badly_is_skipped_after_max_fails(
    nursery, autojump_clock, mode, status
):
    servers = TwoServers(nursery, mode)
    proxy = make_proxy(servers)
    with trio.fail_after(300):
        statuses = [await get(nursery, proxy) for _ in range(8)]
    # Round robin: A's first two turns fail (these clients see the failure), then A is
    # skipped and everything goes to B.
    assert statuses == [status, 200, status, 200, 200, 200, 200, 200]
    assert servers.a.faults[mode] == 2 and len(servers.b.requests) == 6


async def test_failures_further_apart_than_fail_window_do_not_mark_down(nursery, autojump_clock):
    servers = TwoServers(nursery, "garbage")
    proxy = make_proxy(servers)
    with trio.fail_after(300):
        statuses = []
        for _ in range(3):  # A fails once per 12 s: never 2 within the 10 s window
            statuses += [await get(nursery, proxy), await get(nursery, proxy)]
            await trio.sleep(12.0)
    assert statuses == [502, 200] * 3
    assert servers.a.faults["garbage"] == 3


async def test_single_server_is_never_marked_down(nursery, autojump_clock):
    a = FaultyUpstream(mode="garbage")
    proxy = Proxy(make_config(1, **HEALTH), connect=a.connector(nursery))
    with trio.fail_after(300):
        statuses = [await get(nursery, proxy) for _ in range(5)]
    # Skipping the only server would turn each 502 into a "no server available" 502 that
    # hides the real cause; with one server the failures are answered as they come.
    assert statuses == [502] * 5 and a.faults["garbage"] == 5


async def test_real_sockets_refused_server_is_skipped(nursery):
    good = FaultyUpstream(mode="ok")
    good_port = await nursery.start(good.serve)
    dead_port = await refused_port()
    config = make_config(dead_port, good_port, max_fails=1, fail_window=10.0, fail_timeout=60.0)
    proxy = await start_proxy(nursery, config)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.port) as client:
            for _ in range(6):
                assert (await client.request("GET", "/ok")).status == 200
    # One refused connect (retried on the good server) and the dead one is out of rotation.
    assert good.faults["ok"] == 6
    stats = proxy.pool(index=0).statistics()
    assert stats.opened == 0 and stats.in_use == 0
