"""Active health checks: a server that fails ``fall`` probes in a row is out of rotation until
it passes ``rise``; requests go to the others meanwhile. Probes use connections of their own,
stop during a drain and with their upstream on a reload. MockClock over in-memory upstreams,
then the whole thing on real sockets with /readyz and the metrics."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import replace

import trio
import trio.testing

from pooled_proxy.config import AdminConfig, HealthCheckConfig, ServerAddress
from pooled_proxy.proxy import Proxy
from pooled_proxy.upstream.connection import UpstreamConnection
from pooled_proxy.upstream.health import ProbeState
from tests.support.faulty_upstream import (
    ProbedUpstream,
    memory_client,
    read_until_close,
    wait_until,
)
from tests.support.helpers import H11Client, make_config
from tests.support.operations import start_operated_proxy

CHECK = HealthCheckConfig(path="/healthz", interval=5.0, timeout=1.0, rise=2, fall=3)


class Servers:
    """Upstream "app" on ports 1 and 2 over memory streams, for MockClock."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.a, self.b = ProbedUpstream(), ProbedUpstream()
        self._connect = {1: self.a.connector(nursery), 2: self.b.connector(nursery)}

    async def connect(self, server: ServerAddress) -> UpstreamConnection:
        return await self._connect[server.port](server)


async def get(nursery: trio.Nursery, proxy: Proxy) -> int:
    client = memory_client(nursery, proxy)
    await client.send_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    reply = await read_until_close(client)
    return int(reply.split(b" ", 2)[1])


async def until(predicate: Callable[[], bool]) -> None:
    """Wait (on the MockClock) until ``predicate`` holds; probes are seconds apart, so the
    state right after a probe is seen before the next one."""
    while not predicate():
        await trio.sleep(0.01)


def probes_done(state: ProbeState | None) -> int:
    assert state is not None
    return sum(state.results.values())


async def start(nursery: trio.Nursery, servers: Servers, *ports: int, **upstream: object) -> Proxy:
    config = make_config(*ports, health_check=CHECK, **upstream)
    proxy = Proxy(config, connect=servers.connect)
    await nursery.start(proxy.run_pools)
    return proxy


async def test_out_after_fall_failures_back_after_rise_passes(nursery, autojump_clock):
    servers = Servers(nursery)
    proxy = await start(nursery, servers, 1, 2)
    group = proxy.forwarder.upstreams["app"]
    state = group.probes[0]
    with trio.fail_after(600):
        await until(lambda: probes_done(state) == 2)
        assert servers.a.probes == 2 and group.in_rotation(0, trio.current_time())
        servers.a.health = "failing"
        for failed in (1, 2, 3):
            await until(lambda n=failed: probes_done(state) == 2 + n)
            # In rotation until the third failure in a row; requests alternate meanwhile.
            assert group.in_rotation(0, trio.current_time()) == (failed < 3)
        before = servers.a.served
        assert [await get(nursery, proxy) for _ in range(6)] == [200] * 6
        assert servers.a.served == before  # all six went to B
        servers.a.health = "ok"
        await until(lambda: probes_done(state) == 6)
        assert not group.in_rotation(0, trio.current_time())  # one pass is not enough
        await until(lambda: probes_done(state) == 7)
        assert group.in_rotation(0, trio.current_time())
        assert [await get(nursery, proxy) for _ in range(4)] == [200] * 4
        assert servers.a.served == before + 2  # round robin again
    assert state is not None
    assert dict(state.results) == {"pass": 4, "status": 3}
    probe_request = next(r for r in servers.a.requests if r.target == b"/healthz")
    assert probe_request.method == b"GET" and (b"host", b"127.0.0.1:1") in probe_request.headers
    assert dict(state.changes) == {"down": 1, "up": 1}
    # Each probe had a connection of its own, none of the request pool's.
    assert servers.a.connections_opened == 7 + 1
    assert proxy.forwarder.upstreams["app"].pools[0].statistics().opened == 1


async def test_timeouts_and_refused_connects_fail_probes(nursery, autojump_clock):
    servers = Servers(nursery)
    proxy = await start(nursery, servers, 1, 2)
    group = proxy.forwarder.upstreams["app"]
    servers.a.health = "hang"
    servers.b.refusing = True
    with trio.fail_after(600):
        await until(lambda: probes_done(group.probes[0]) == 3 and probes_done(group.probes[1]) == 3)
        assert [dict(p.results) for p in group.probes if p] == [
            {"timeout": 3},
            {"connect_error": 3},
        ]
        # The hanging probes were cut at the probe timeout: nothing of theirs is left open.
        await trio.testing.wait_all_tasks_blocked()
        assert servers.a.connections_open == 0
        # No server in rotation: the client gets a 502 at once, nothing is tried.
        assert await get(nursery, proxy) == 502
    assert servers.a.served == servers.b.served == 0


async def test_single_server_out_of_rotation_is_unavailable(nursery, autojump_clock):
    servers = Servers(nursery)
    proxy = await start(nursery, servers, 1, host_header="app.internal")
    servers.a.health = "failing"
    state = proxy.forwarder.upstreams["app"].probes[0]
    with trio.fail_after(600):
        assert await get(nursery, proxy) == 200
        await until(lambda: probes_done(state) == 3)
        assert await get(nursery, proxy) == 502
        servers.a.health = "ok"
        await until(lambda: probes_done(state) == 5)
        assert await get(nursery, proxy) == 200
    # Probes name the server as requests do: the upstream's host_header.
    assert {dict(r.headers)[b"host"] for r in servers.a.requests} == {b"app.internal"}


async def test_probes_are_spread_and_stop_during_a_drain(nursery, autojump_clock):
    servers = Servers(nursery)
    times: dict[int, list[float]] = {1: [], 2: []}

    async def connect(server: ServerAddress) -> UpstreamConnection:
        times[server.port].append(trio.current_time())
        return await servers.connect(server)

    started = trio.current_time()
    proxy = Proxy(make_config(1, 2, health_check=CHECK), connect=connect)
    await nursery.start(proxy.run_pools)
    with trio.fail_after(600):
        await until(lambda: min(len(t) for t in times.values()) >= 6)
        # A's first probe in the first half of the interval, B's in the second; then one
        # about every interval (jitter within 10%).
        first_a, first_b = times[1][0] - started, times[2][0] - started
        assert 0 <= first_a < 2.5 <= first_b < 5.0
        for probe_times in times.values():
            for earlier, later in itertools.pairwise(probe_times):
                assert 4.5 <= later - earlier <= 5.5
        proxy.begin_drain()
        counts = [len(t) for t in times.values()]
        await trio.sleep(60.0)
    assert [len(t) for t in times.values()] == counts  # none since the drain started


async def test_reload_stops_a_removed_upstreams_probers_and_keeps_the_others(
    nursery, autojump_clock
):
    servers = Servers(nursery)
    proxy = await start(nursery, servers, 1)
    other = replace(proxy.config.upstreams["app"], name="other", servers=(ServerAddress("h", 2),))
    both = replace(proxy.config, upstreams={"app": proxy.config.upstreams["app"], "other": other})
    with trio.fail_after(600):
        proxy.reload(both)  # "app" kept, with its probers and their state; "other" added
        await until(lambda: servers.a.probes >= 2 and servers.b.probes >= 2)
        only_other = replace(both, upstreams={"other": other}, routes=(replace(
            both.routes[0], upstream="other"),))  # fmt: skip
        summary = proxy.reload(only_other)
        assert summary.removed == ("app",)
        a_probes, b_probes = servers.a.probes, servers.b.probes
        await trio.sleep(20.0)
    assert servers.a.probes == a_probes  # the removed upstream's prober stopped
    assert servers.b.probes >= b_probes + 3


async def test_passive_failures_still_count_with_active_checks(nursery, autojump_clock):
    # The probes pass, but requests fail: passive health takes the server out all the same.
    servers = Servers(nursery)
    proxy = await start(nursery, servers, 1, 2, max_fails=2, fail_timeout=30.0)
    servers.a.mode = "reset-before-head"  # every request to A, probes excepted
    with trio.fail_after(600):
        statuses = [await get(nursery, proxy) for _ in range(6)]
    # A's turns (the 1st and 3rd requests) fail and go on to B, which answers them.
    assert statuses == [200] * 6
    assert servers.a.served == 2 and servers.b.served == 6
    group = proxy.forwarder.upstreams["app"]
    assert group.probes[0] is not None and group.probes[0].up
    assert not group.in_rotation(0, trio.current_time())


async def test_on_real_sockets_with_readyz_and_metrics(nursery, caplog):
    caplog.set_level(logging.WARNING, logger="pooled_proxy.health")
    a, b = ProbedUpstream(), ProbedUpstream()
    a_port, b_port = await nursery.start(a.serve), await nursery.start(b.serve)
    fast = HealthCheckConfig(path="/healthz", interval=0.05, timeout=0.5, rise=2, fall=3)
    config = make_config(a_port, b_port, health_check=fast)
    config = replace(
        config,
        admin=AdminConfig(
            listen=ServerAddress("127.0.0.1", 0), ready_requires_healthy_upstreams=True
        ),
    )
    proxy = await start_operated_proxy(nursery, config)
    group = proxy.running.proxy.forwarder.upstreams["app"]
    async with await H11Client.connect(proxy.admin.address.port) as admin:  # type: ignore[union-attr]
        with trio.fail_after(10):
            await wait_until(lambda: a.probes >= 2 and b.probes >= 2, timeout=5)
            assert (await admin.request("GET", "/readyz")).status == 200
            a.health = "failing"
            await wait_until(lambda: group.probes[0].up is False, timeout=5)  # type: ignore[union-attr]
            async with await H11Client.connect(proxy.running.port) as client:
                before = a.served
                for _ in range(5):
                    assert (await client.request("GET", "/ok")).status == 200
                assert a.served == before
            assert (await admin.request("GET", "/readyz")).status == 200  # B is up
            [app] = (await admin.request("GET", "/upstreams")).json()["upstreams"]
            health = app["servers"][0]["health"]
            assert (health["healthy"], health["active_health"]["up"]) == (False, False)
            assert health["reason"].startswith("failed 3 health check(s) in a row (fall)")
            b.health = "failing"
            await wait_until(lambda: group.probes[1].up is False, timeout=5)  # type: ignore[union-attr]
            ready = await admin.request("GET", "/readyz")
            assert (ready.status, ready.body) == (503, b"no healthy server in upstream(s): app\n")
            a.health = b.health = "ok"
            await wait_until(lambda: all(p.up for p in group.probes if p), timeout=5)
            assert (await admin.request("GET", "/readyz")).status == 200
            scrape = await proxy.scrape()
    server_a = f"127.0.0.1:{a_port}"
    changes = "pooled_proxy_upstream_health_changes_total"
    assert scrape.value(changes, server=server_a, state="down") == 1
    assert scrape.value(changes, server=server_a, state="up") == 1
    probes = "pooled_proxy_upstream_health_probes_total"
    assert scrape.value(probes, server=server_a, result="status") >= 3
    assert scrape.value(probes, server=server_a, result="pass") >= 4
    assert scrape.value("pooled_proxy_upstream_server_healthy", server=server_a) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert f"upstream app: server {server_a} failed 3 health check(s) in a row (last: status): " \
        "out of rotation" in messages  # fmt: skip
