"""``server.workers = 2``: the real supervisor and its workers as subprocesses.

Which worker serves a connection is read from the kernel: the server side of the TCP
connection (found in /proc/net/tcp by its ports) is a socket one worker process holds open.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import h11
import httpx
import pytest
import trio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from pooled_proxy import __version__
from pooled_proxy.daemon.demo_upstream import DemoUpstream
from tests.support.daemon import DaemonConfig, pids_serving, running_daemon, serving_pid
from tests.support.helpers import HOST, H11Client, connection_storm
from tests.support.operations import Scrape

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memfd_create and /proc are Linux's"
)


def routes(*names: str) -> list[dict[str, object]]:
    return [{"path_prefix": f"/{n}/", "upstream": n, "strip_prefix": True} for n in names]


def listening_socket_holders(port: int, pids: set[int]) -> list[set[int]]:
    """For each listening socket on ``port``, which of ``pids`` hold it."""
    inodes = []
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(f"socket:[{fields[9]}]")
    holders: list[set[int]] = [set() for _ in inodes]
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in inodes:
                holders[inodes.index(target)].add(pid)
    return holders


async def test_two_workers_accept_from_one_socket_a_killed_one_comes_back_and_sigterm_drains(
    nursery, demo_upstream, tmp_path
):
    upstream, upstream_port = demo_upstream
    # The slow requests must still be in flight when SIGTERM comes, after the connection
    # storm has started: on a loaded machine that can take seconds.
    config = DaemonConfig(upstreams={"app": upstream_port}, workers=2, drain_timeout="10s")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(30):
            first = daemon.worker_pids
            assert len(first) == 2
            # Both workers accept from the supervisor's one listening socket (group.py
            # balances between them), and both take connections.
            assert listening_socket_holders(daemon.port, first) == [first]
            assert await pids_serving(daemon, first, "/echo", 20) == first

            # A worker that dies is restarted, and the new one serves too.
            victim = min(first)
            mark = len(daemon.lines)
            os.kill(victim, signal.SIGKILL)
            await daemon.wait_for_line(rf"\(pid {victim}\) died \(killed by SIGKILL\); restarting",
                                       after=mark)  # fmt: skip
            started = await daemon.wait_for_line(r"worker \d+ started: pid (\d+)", after=mark)
            newcomer = int(started[1])
            await daemon.wait_for_line(rf"pid {newcomer}\]: listening on", after=mark)
            now = first - {victim} | {newcomer}
            assert newcomer in await pids_serving(daemon, now, "/echo", 20)

            # SIGTERM to the supervisor drains every worker: requests in flight on both of
            # them finish, then everything exits 0.
            clients = [await H11Client.connect(daemon.port) for _ in range(16)]
            try:
                in_flight_on = set()
                for client in clients:
                    assert (await client.request("GET", "/echo")).status == 200
                    in_flight_on.add(serving_pid(daemon.port, client, now))
                base = upstream.stats.requests
                slow = h11.Request(method="GET", target="/slow?delay=3", headers=[("host", "x")])
                for client in clients:
                    await client.send(slow, h11.EndOfMessage())
                while upstream.stats.requests < base + len(clients):
                    await trio.sleep(0.01)
                # Clients keep connecting through the drain: each worker still closes its
                # listener at once, and from then on a connect is refused.
                async with connection_storm(daemon.port) as storm:
                    await storm.started()
                    mark = len(daemon.lines)
                    daemon.send_signal(signal.SIGTERM)
                    with trio.fail_after(2):
                        await daemon.wait_for_count(r"stopped listening on 127\.0\.0\.1:", 2)
                    assert await storm.outcome() == "refused"
                assert not [line for line in daemon.lines[mark:] if "drain complete" in line]
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", daemon.port)
                for client in clients:
                    reply = await client.read_reply()
                    assert reply.status == 200 and reply.headers[b"connection"] == b"close"
            finally:
                for client in clients:
                    await client.aclose()
            assert await daemon.wait() == 0
    assert in_flight_on == now
    for pid in now:
        assert daemon.has_line(f"(pid {pid}) exited: exit code 0")
    assert len(daemon.matches(r"pid \d+\]: drain complete after .*all finished")) == 2
    assert daemon.has_line("all workers stopped")


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent that no longer exists to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_reload_reaches_every_worker_restarts_use_the_last_good_config_and_orphans_drain(
    nursery, tmp_path
):
    a, b = DemoUpstream(), DemoUpstream()
    a_port, b_port = await nursery.start(a.serve), await nursery.start(b.serve)
    config = DaemonConfig(upstreams={"a": a_port}, routes=routes("a"), workers=2)
    bad = DaemonConfig(upstreams={"a": a_port}, routes=routes("a", "nope"), workers=2)
    good = DaemonConfig(upstreams={"a": a_port, "b": b_port}, routes=routes("a", "b"), workers=2)
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            pids = daemon.worker_pids

            # A bad file is reported once, by the supervisor, and reaches no worker.
            daemon.config_path.write_text(bad.to_toml())
            mark = len(daemon.lines)
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for_line(r"proxy\.toml:\d+: routes\[1\]\.upstream", after=mark)

            daemon.config_path.write_text(good.to_toml())
            daemon.send_signal(signal.SIGHUP)
            reloaded = await daemon.wait_for_count(r"pid (\d+)\]: config reloaded \(SIGHUP\)", 2)
            assert {int(m[1]) for m in reloaded} == pids
            assert await pids_serving(daemon, pids, "/b/echo", 20) == pids  # both route /b/

            # The file breaks again; a worker that dies now restarts with the last good
            # config (the supervisor hands it over), not with the broken file.
            daemon.config_path.write_text(bad.to_toml())
            victim = min(pids)
            mark = len(daemon.lines)
            os.kill(victim, signal.SIGKILL)
            started = await daemon.wait_for_line(r"worker \d+ started: pid (\d+)", after=mark)
            newcomer = int(started[1])
            await daemon.wait_for_line(rf"pid {newcomer}\]: listening on", after=mark)
            now = pids - {victim} | {newcomer}
            assert newcomer in await pids_serving(daemon, now, "/b/echo", 20)

            # The supervisor vanishes: its workers see their stdin close, drain and exit.
            mark = len(daemon.lines)
            daemon.process.kill()
            gone = await daemon.wait_for_count(r"pid (\d+)\]: supervisor gone: draining", 2)
            assert {int(m[1]) for m in gone} == now
            while not all(exited(pid) for pid in now):
                await trio.sleep(0.05)
    assert len(daemon.matches(r"reload failed: .* has 1 problem")) == 1
    assert not daemon.matches(r"\]: reload failed")
    assert len(daemon.matches(r"pid \d+\]: drain complete after")) == 2


async def scrape(port: int) -> Scrape:
    """The group's /metrics, in both formats: parsed as Prometheus text, and checked to
    parse as OpenMetrics with the same request count."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{HOST}:{port}/metrics")
        openmetrics = await client.get(
            f"http://{HOST}:{port}/metrics",
            headers={"accept": "application/openmetrics-text; version=1.0.0"},
        )
    assert response.status_code == 200 and openmetrics.status_code == 200
    scraped = Scrape.parse(response.text)
    families = {f.name: f for f in openmetrics_families(openmetrics.text)}
    counted = sum(s.value for s in families["pooled_proxy_requests"].samples
                  if s.name == "pooled_proxy_requests_total")  # fmt: skip
    assert counted == scraped.value("pooled_proxy_requests_total")
    return scraped


async def test_metrics_are_the_sum_of_every_worker_and_survive_a_worker_restart(
    nursery, demo_upstream, tmp_path
):
    _, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port}, workers=2, admin=f"{HOST}:0")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            admin = int((await daemon.wait_for_line(r"admin listening on http://[\d.]+:(\d+)"))[1])
            pids = daemon.worker_pids
            # 20 requests on 20 connections: the kernel spreads them over both workers.
            assert await pids_serving(daemon, pids, "/echo", 20) == pids
            first = await scrape(admin)
            assert first.value("pooled_proxy_requests_total", status_class="2xx") == 20
            assert first.value("pooled_proxy_request_duration_seconds_count") == 20
            assert first.value("pooled_proxy_upstream_connections_opened_total") >= 2
            # Per process: each worker and the supervisor.
            for worker in ("0", "1", "supervisor"):
                assert first.value("process_resident_memory_bytes", worker=worker) > 0
            assert first.value("pooled_proxy_draining", worker="1") == 0
            assert first.value("pooled_proxy_build_info", version=__version__) == 1
            assert first.value("pooled_proxy_config_last_reload_success") == 1
            loaded = first.value("pooled_proxy_config_last_reload_success_timestamp_seconds")
            assert abs(loaded - time.time()) < 60

            # A worker dies: its counts stay in the sum while its successor starts from 0.
            victim = min(pids)
            mark = len(daemon.lines)
            os.kill(victim, signal.SIGKILL)
            started = await daemon.wait_for_line(r"worker \d+ started: pid (\d+)", after=mark)
            await daemon.wait_for_line(rf"pid {started[1]}\]: listening on", after=mark)
            assert await pids_serving(daemon, pids - {victim} | {int(started[1])}, "/echo", 2)
            second = await scrape(admin)
            assert second.value("pooled_proxy_requests_total") == 22

            # A bad file on SIGHUP: the group reports the failed reload.
            daemon.config_path.write_text(config.to_toml().replace("[admin]", "[admni]"))
            mark = len(daemon.lines)
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for_line("reload failed", after=mark)
            third = await scrape(admin)
            assert third.value("pooled_proxy_config_last_reload_success") == 0
            assert third.value("pooled_proxy_requests_total") == 22
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0


async def _until_ready(client: httpx.AsyncClient, url: str) -> None:
    """/readyz turns 200 (within the caller's deadline): a worker that has just started, or
    just seen its server come back, may answer its first report a moment later."""
    while (await client.get(url)).status_code != 200:
        await trio.sleep(0.05)


async def test_readyz_of_the_group_asks_every_worker_about_its_upstreams(nursery, tmp_path):
    # Each worker probes on its own; /readyz (the supervisor's) is 503 while a worker has an
    # upstream with no server in rotation.
    from tests.support.faulty_upstream import ProbedUpstream

    upstream = ProbedUpstream()
    upstream_port = await nursery.start(upstream.serve)
    # A probe's timeout with room for a loaded machine: one late answer (fall = 1) would take
    # the server out by itself.
    check = {"interval": "500ms", "timeout": "500ms", "rise": 1, "fall": 1}
    config = DaemonConfig(
        upstreams={"app": upstream_port},
        workers=2,
        admin=f"{HOST}:0",
        admin_keys={"ready_requires_healthy_upstreams": True},
        upstream_keys={"health_check": check},
    )
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            admin = int((await daemon.wait_for_line(r"admin listening on http://[\d.]+:(\d+)"))[1])
            url = f"http://{HOST}:{admin}/readyz"
            async with httpx.AsyncClient() as client:
                await _until_ready(client, url)
                upstream.health = "failing"
                await daemon.wait_for_count(r"failed 1 health check\(s\) in a row", 2)
                ready = await client.get(url)
                assert (ready.status_code, ready.text) == (
                    503, "no healthy server in upstream(s): app\n"
                )  # fmt: skip
                upstream.health = "ok"
                await daemon.wait_for_count(r"back in rotation", 2)
                await _until_ready(client, url)
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0
