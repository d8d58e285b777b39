"""The admin's status endpoints on real sockets: /upstreams (health and why, pools, queues,
requests and errors by kind), /config (generation, file, no key contents), /status and its
live feed /events (Server-Sent Events), the page at /, and the once-a-sample rate history."""

from __future__ import annotations

import json
import re
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
import trustme

from pooled_proxy.config import (
    ServerAddress,
    ServerConfig,
    UpstreamConfig,
    load_config,
)
from pooled_proxy.errors import UpstreamConnectError
from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.ops.metrics import ProxyMetrics
from pooled_proxy.ops.status import StatusBoard, config_json, merge_statuses
from pooled_proxy.proxy import Proxy
from pooled_proxy.upstream.balancer import ServerHealth
from tests.support.daemon import DaemonConfig, pids_serving, running_daemon
from tests.support.faulty_upstream import refused_port
from tests.support.h2client import H2Client
from tests.support.helpers import HOST, H11Client, make_config, two_upstreams
from tests.support.operations import OperatedProxy, start_operated_proxy
from tests.support.websocket import WSClient, WSEchoUpstream

CONFIG_DIR = Path(__file__).parents[2] / "config"


async def get_json(proxy: OperatedProxy, path: str) -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.get(proxy.admin_url + path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    return response.json()


def by_name(items: list[dict[str, Any]], key: str, value: str) -> dict[str, Any]:
    [item] = [item for item in items if item[key] == value]
    return item


async def test_upstreams_show_health_and_why_pools_queues_requests_and_errors(
    nursery, demo_upstream
):
    _, good = demo_upstream
    dead = await refused_port()
    config = two_upstreams(
        (good, dead), (dead,), max_connections=1, queue_size=8, max_fails=1, fail_timeout=60.0
    )
    proxy = await start_operated_proxy(nursery, config)
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.running.port) as client:
            # Round robin: one of these meets the dead server, is retried on the good one,
            # and the dead server is out (max_fails = 1).
            for _ in range(3):
                assert (await client.request("GET", "/echo")).status == 200
            assert (await client.request("GET", "/status/503")).status == 503
            assert (await client.request("GET", "/other/x")).status == 502
        # One exchange holds app's only connection (max_connections = 1), one waits for it.
        holder = await H11Client.connect(proxy.running.port)
        waiter = await H11Client.connect(proxy.running.port)
        request = h11.Request(method="GET", target="/slow?delay=0.4", headers=[("host", "x")])
        await holder.send(request, h11.EndOfMessage())
        while proxy.running.pool(index=0).statistics().in_use == 0:
            await trio.sleep(0.01)
        await waiter.send(request, h11.EndOfMessage())
        while proxy.running.pool(index=0).statistics().waiting == 0:
            await trio.sleep(0.01)
        answer = await get_json(proxy, "/upstreams")
        assert (await holder.read_reply()).status == 200
        assert (await waiter.read_reply()).status == 200
        await holder.aclose()
        await waiter.aclose()

    assert answer["process"]["workers"] == 1
    upstreams = answer["upstreams"]
    assert [u["name"] for u in upstreams] == ["app", "other"]
    app, other = upstreams
    assert app["routes"] == ["*/"] and other["routes"] == ["*/other/"]
    assert app["requests"] == {"total": 4, "by_status": {"2xx": 3, "5xx": 1}}
    assert app["errors"] == {}  # the upstream's own 503 is not the proxy's error

    good_server = by_name(app["servers"], "address", f"{HOST}:{good}")
    assert good_server["health"] == {
        "healthy": True,
        "state": "up",
        "reason": None,
        "active_health": None,
        "passive_health": True,
        "recent_failures": 0,
        "down_for": None,
        "down_until": None,
        "last_failure": None,
    }
    pool = good_server["pool"]
    assert (pool["in_use"], pool["queued"], pool["connecting"]) == (1, 1, 0)
    assert (pool["max_connections"], pool["queue_size"]) == (1, 8)
    assert good_server["requests"] == 5  # 4 finished, 1 in flight
    assert good_server["connections"]["opened"] == 1

    dead_server = by_name(app["servers"], "address", f"{HOST}:{dead}")
    health = dead_server["health"]
    assert (health["healthy"], health["state"], health["passive_health"]) == (False, "down", True)
    assert 55 < health["down_for"] <= 60
    assert re.fullmatch(
        r"1 failure within 10s \(max_fails\): skipped for (60\.0|5\d\.\d)s more \(fail_timeout 60s\)",
        health["reason"],
    ), health["reason"]
    assert health["last_failure"]["error"] == "connection_refused"
    assert dead_server["requests"] == 0 and dead_server["pool"]["in_use"] == 0

    # The only server of "other" failed, but is never skipped: its failures are answered.
    [only] = other["servers"]
    assert only["health"]["state"] == "up" and not only["health"]["passive_health"]
    assert only["health"]["recent_failures"] == 1
    assert "the upstream's only server" in only["health"]["reason"]
    assert only["errors"] == {"connection_refused": 1}
    assert other["errors"] == {"connection_refused": 1}
    assert other["requests"] == {"total": 1, "by_status": {"5xx": 1}}


async def test_config_is_the_running_one_with_generation_and_file_never_key_contents(
    nursery, demo_upstream, tmp_path: Path
):
    _, port = demo_upstream
    issued = trustme.CA().issue_cert(HOST)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    path = tmp_path / "proxy.toml"
    path.write_text(
        f"""
[server]
listen = ["{HOST}:0"]
drain_timeout = "2500ms"
[server.tls]
listen = ["{HOST}:0"]
cert = "{cert}"
key = "{key}"
[upstreams.app]
servers = ["http://{HOST}:{port}"]
max_connections = 7
[[routes]]
upstream = "app"
"""
    )
    config = load_config(str(path))
    proxy = await start_operated_proxy(nursery, config)
    with trio.fail_after(5):
        first = await get_json(proxy, "/config")
        app = replace(config.upstreams["app"], max_connections=9)
        proxy.running.proxy.reload(replace(config, upstreams={"app": app}))
        second = await get_json(proxy, "/config")
        async with httpx.AsyncClient() as client:
            raw = (await client.get(proxy.admin_url + "/config")).text

    assert first["generation"] == 1 and second["generation"] == 2
    assert first["file"] == str(path) and second["file"] == str(path)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["loaded_at"])
    running = first["config"]
    assert running["server"]["drain_timeout"] == 2.5  # durations in seconds
    assert running["server"]["tls"]["key"] == str(key)  # the path, shown
    assert running["upstreams"]["app"]["servers"] == [f"{HOST}:{port}"]
    assert running["upstreams"]["app"]["max_connections"] == 7
    assert running["routes"] == [
        {"upstream": "app", "host": None, "path_prefix": "/", "strip_prefix": False,
         "hooks": [], "hook_timeout": None}
    ]  # fmt: skip
    assert second["config"]["upstreams"]["app"]["max_connections"] == 9
    key_pem = key.read_text()
    assert "PRIVATE KEY" in key_pem and "PRIVATE KEY" not in raw  # the contents, never


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_has_a_json_form(path: Path):
    text = json.dumps(config_json(load_config(str(path))), allow_nan=False)
    assert json.loads(text)["upstreams"]


class EventReader:
    """A client of ``/events`` on one real connection: the JSON of each event's data line."""

    def __init__(self, client: H11Client) -> None:
        self.client = client
        self.buffer = b""

    @classmethod
    async def open(cls, url_port: int) -> tuple[EventReader, h11.Response]:
        client = await H11Client.connect(url_port)
        await client.send(
            h11.Request(method="GET", target="/events", headers=[("host", "admin")]),
            h11.EndOfMessage(),
        )
        response = await client.next_event()
        assert isinstance(response, h11.Response), response
        return cls(client), response

    async def next(self) -> dict[str, Any]:
        while True:
            if b"\n\n" in self.buffer:
                event, self.buffer = self.buffer.split(b"\n\n", 1)
                for line in event.decode().splitlines():
                    if line.startswith("data: "):
                        return dict(json.loads(line[len("data: ") :]))
                continue
            data = await self.client.next_event()
            assert isinstance(data, h11.Data), data
            self.buffer += data.data


async def test_events_send_the_status_at_once_then_every_sample(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port), sample_interval=0.05)
    admin = proxy.admin
    seen: list[dict[str, Any]] = []
    with trio.fail_after(10):
        assert proxy.admin.address is not None
        events, response = await EventReader.open(proxy.admin.address.port)
        headers = dict(response.headers)
        assert response.status_code == 200
        assert headers[b"content-type"] == b"text/event-stream"
        assert headers[b"cache-control"] == b"no-store"
        seen.append(await events.next())
        assert [u["name"] for u in seen[0]["upstreams"]] == ["app"]
        assert seen[0]["requests"]["total"] == 0
        assert admin.event_streams == 1
        async with await H11Client.connect(proxy.running.port) as traffic:
            for _ in range(5):
                assert (await traffic.request("GET", "/echo")).status == 200
            assert (await traffic.request("GET", "/status/500")).status == 500
        while not (
            seen[-1]["requests"]["total"] == 6
            and any(point[2] > 0 for point in seen[-1]["history"]["points"])
        ):
            seen.append(await events.next())
        await events.client.aclose()
        # The viewer left: its stream ends at the next sample.
        while admin.event_streams:
            await trio.sleep(0.01)
    last = seen[-1]
    assert last["requests"] == {"total": 6, "server_errors": 1}
    [app] = last["upstreams"]
    assert app["requests"]["by_status"] == {"2xx": 5, "5xx": 1}
    points = last["history"]["points"]
    assert all(point[1] >= point[2] >= 0 for point in points)
    assert sorted(point[0] for point in points) == [point[0] for point in points]
    assert last["history"]["columns"] == ["at", "requests_per_second", "server_errors_per_second"]


async def test_too_many_event_streams_get_a_503(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    proxy.admin.max_event_streams = 1
    with trio.fail_after(5):
        async with (
            httpx.AsyncClient() as client,
            client.stream("GET", proxy.admin_url + "/events") as first,
        ):
            assert first.status_code == 200
            second = await client.get(proxy.admin_url + "/events")
            head = await client.head(proxy.admin_url + "/events")
    assert (second.status_code, second.text) == (503, "too many event streams\n")
    assert head.status_code == 503


async def test_event_streams_asked_for_at_once_stay_within_the_bound(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    proxy.admin.max_event_streams = 1
    assert proxy.admin.address is not None
    request = b"GET /events HTTP/1.1\r\nHost: admin\r\n\r\n"
    # Every request is in the admin's sockets before it runs at all: plain blocking sockets,
    # written without yielding to the event loop the admin server shares with this test.
    viewers = [socket.create_connection(("127.0.0.1", proxy.admin.address.port)) for _ in range(4)]
    for viewer in viewers:
        viewer.sendall(request)
    statuses = []
    with trio.fail_after(5):
        for viewer in viewers:
            async with trio.SocketStream(trio.socket.from_stdlib_socket(viewer)) as stream:
                head = b""
                while b"\r\n" not in head:
                    head += await stream.receive_some(4096)
                statuses.append(int(head.split(b" ", 2)[1]))
    assert sorted(statuses) == [200, 503, 503, 503]


async def test_status_counts_clients_by_protocol_streams_tunnels_and_the_drain(
    nursery, demo_upstream
):
    _, port = demo_upstream
    ws_upstream = WSEchoUpstream()
    ws_port = await nursery.start(ws_upstream.serve)
    config = replace(
        two_upstreams((port,), (ws_port,), "/ws"),
        server=ServerConfig(listen=(ServerAddress(HOST, 0),), drain_timeout=5.0),
    )
    proxy = await start_operated_proxy(nursery, config)
    with trio.fail_after(10):
        quiet = await get_json(proxy, "/status")
        sse = await H11Client.connect(proxy.running.port)
        await sse.send(
            h11.Request(method="GET", target="/events?count=1000", headers=[("host", "x")]),
            h11.EndOfMessage(),
        )
        assert isinstance(await sse.next_event(), h11.Response)
        ws = await WSClient.connect(proxy.running.port)
        h2 = await H2Client.connect(proxy.running.port)
        busy = await get_json(proxy, "/status")
        while (
            busy["clients"]["by_protocol"].get("h2") != 1
            or busy["websocket_tunnels"] != 1
            or busy["event_streams"] != 1
        ):
            busy = await get_json(proxy, "/status")
        await sse.aclose()
        await ws.stream.aclose()
        await h2.stream.aclose()
        while proxy.running.proxy.active_exchanges or proxy.running.proxy.client_connections:
            await trio.sleep(0.01)
        proxy.running.proxy.begin_drain()
        draining = await get_json(proxy, "/status")

    assert quiet["clients"] == {"total": 0, "by_protocol": {}}
    assert (quiet["event_streams"], quiet["websocket_tunnels"], quiet["draining"]) == (0, 0, None)
    assert quiet["generation"] == 1
    assert busy["clients"] == {"total": 3, "by_protocol": {"h2": 1, "http/1.1": 2}}
    assert busy["exchanges_in_flight"] == 2
    assert (busy["event_streams"], busy["websocket_tunnels"]) == (1, 1)
    assert draining["websocket_tunnels"] == 0 and draining["event_streams"] == 0
    assert draining["draining"]["drain_timeout"] == 5.0
    assert 0 <= draining["draining"]["seconds"] < 1


async def test_page_is_self_contained_html(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    with trio.fail_after(5):
        async with httpx.AsyncClient() as client:
            page = await client.get(proxy.admin_url + "/")
            head = await client.head(proxy.admin_url + "/")
    assert page.status_code == 200 and head.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    html = page.text
    assert html.startswith("<!doctype html>") and 'new EventSource("events")' in html
    # Nothing to fetch from anywhere: no src/href attributes, no CSS url() or @import.
    assert not re.search(r"\b(src|href)\s*=|url\(|@import", html, re.IGNORECASE)
    assert head.headers["content-length"] == str(len(page.content))


def record(status: int) -> ExchangeRecord:
    return ExchangeRecord(start=0.0, wall_start=0.0, status=status, route_upstream="app")


async def test_rate_history_is_one_sample_per_interval_in_a_bounded_ring(autojump_clock):
    metrics = ProxyMetrics()
    board = StatusBoard(Proxy(make_config(9)), metrics, interval=1.0, history=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(board.run_sampler)
        await trio.sleep(0.5)  # between samples from here on
        for second in range(8):
            for _ in range(second):
                metrics.observe(record(200))
            if second % 2:
                metrics.observe(record(502))
            await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert board.ticks == 9
    points = board.rates()
    assert len(points) == 5 == len(board.samples) - 1  # the last five seconds only
    assert [p[1] for p in points] == [3 + 1, 4, 5 + 1, 6, 7 + 1]
    assert [p[2] for p in points] == [1, 0, 1, 0, 1]


def test_recent_failures_are_those_within_fail_window():
    config = UpstreamConfig(
        name="app", servers=(ServerAddress(HOST, 1),), max_fails=3, fail_window=10.0
    )
    health = ServerHealth(config)
    health.record_failure(100.0, UpstreamConnectError("refused"))
    health.record_failure(105.0, UpstreamConnectError("refused again"))
    assert [health.recent_failures(now) for now in (105.0, 110.0, 114.0, 116.0)] == [2, 2, 1, 0]
    assert health.last_failure == (105.0, "connection_refused", "refused again")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers through /proc")
async def test_workers_group_status_is_the_sum_of_every_worker(nursery, demo_upstream, tmp_path):
    _, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port}, workers=2, admin=f"{HOST}:0")
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            line = await daemon.wait_for_line(r"admin listening on http://[\d.]+:(\d+)")
            admin = f"http://{HOST}:{line[1]}"
            pids = daemon.worker_pids
            # 20 requests on 20 connections: the kernel spreads them over both workers.
            assert await pids_serving(daemon, pids, "/echo", 20) == pids
            async with httpx.AsyncClient() as client:
                status = (await client.get(admin + "/status")).json()
                upstreams = (await client.get(admin + "/upstreams")).json()
                running = (await client.get(admin + "/config")).json()
                page = await client.get(admin + "/")
            events, _ = await EventReader.open(int(line[1]))
            first_event = await events.next()
            await events.client.aclose()
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait() == 0

    assert status["requests"] == {"total": 20, "server_errors": 0}
    assert status["process"]["workers"] == 2
    assert set(status["process"]["worker_pids"].values()) == pids
    [app] = status["upstreams"]
    assert app["requests"] == {"total": 20, "by_status": {"2xx": 20}}
    [server] = app["servers"]
    assert server["requests"] == 20
    assert server["pool"]["max_connections"] == 200  # two pools of 100
    assert server["health"]["state"] == "up" and server["health"]["down_in"] == []
    assert upstreams["upstreams"] == status["upstreams"]
    assert first_event["requests"]["total"] == 20
    assert running["generation"] == 1 and running["file"] == str(daemon.config_path)
    assert running["config"]["server"]["workers"] == 2
    assert page.status_code == 200 and "EventSource" in page.text


async def test_a_server_down_in_one_worker_is_partly_down_in_the_group():
    boards = []
    for _ in range(2):
        config = make_config(1, 2, max_fails=1, fail_timeout=30.0)
        boards.append(StatusBoard(Proxy(config), ProxyMetrics()))
    failing = boards[1].proxy.forwarder.upstreams["app"].health[0]
    failing.record_failure(trio.current_time(), UpstreamConnectError("refused"))
    merged = merge_statuses([(0, boards[0].snapshot()), (1, boards[1].snapshot())])
    [app] = merged["upstreams"]
    health = app["servers"][0]["health"]
    assert (health["state"], health["healthy"], health["down_in"]) == ("partly_down", False, [1])
    assert health["reason"].startswith("worker 1: 1 failure within 10s (max_fails)")
    assert health["last_failure"]["worker"] == 1
    assert app["servers"][1]["health"]["state"] == "up"
    assert app["servers"][0]["pool"]["max_connections"] == 200
