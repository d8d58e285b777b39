"""The admin listener: /healthz, /readyz (503 while draining), /metrics; up during a drain
until serving ends; and `pooled-proxy run` wiring it all up in a real process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing

from pooled_proxy.config import ServerAddress
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.ops.admin import (
    HEALTH_PATH,
    METRICS_PATH,
    READY_PATH,
    REQUEST_TIMEOUT,
    AdminServer,
)
from pooled_proxy.ops.metrics import ProxyMetrics
from pooled_proxy.proxy import Proxy
from tests.support.cli import CLI, stop, wait_for_port
from tests.support.helpers import HOST, H11Client, make_config
from tests.support.operations import Scrape, start_operated_proxy
from tests.support.ports import free_port


async def test_endpoints_answer_on_one_keepalive_connection(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    assert proxy.admin.address is not None
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.admin.address.port) as admin:
            health = await admin.request("GET", HEALTH_PATH)
            ready = await admin.request("GET", READY_PATH + "?verbose=1")
            metrics = await admin.request("GET", METRICS_PATH)
            missing = await admin.request("GET", "/nope")
            post = await admin.request("POST", READY_PATH, body=b"x")
            head = await admin.request("HEAD", HEALTH_PATH)
    assert (health.status, health.body) == (200, b"ok\n")
    assert (ready.status, ready.body) == (200, b"ready\n")
    assert metrics.status == 200
    assert metrics.headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
    assert "pooled_proxy_upstream_connections" in Scrape.parse(metrics.body.decode()).types
    assert missing.status == 404
    assert (post.status, post.headers[b"allow"]) == (405, b"GET, HEAD")
    assert (head.status, head.body, head.headers[b"content-length"]) == (200, b"", b"3")


async def test_garbage_is_closed_without_an_answer(nursery, demo_upstream):
    _, port = demo_upstream
    proxy = await start_operated_proxy(nursery, make_config(port))
    assert proxy.admin.address is not None
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(HOST, proxy.admin.address.port)
        async with stream:
            await stream.send_all(b"NOT HTTP\r\n\r\n")
            assert await stream.receive_some(100) == b""


async def test_an_idle_admin_connection_is_closed_after_the_request_timeout(autojump_clock):
    proxy = Proxy(make_config(9))
    admin = AdminServer(proxy, ProxyMetrics(), ServerAddress(HOST, 0))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admin._serve_connection, server)
        started = trio.current_time()
        await client.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok\n"):
            answer += await client.receive_some(1000)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await client.receive_some(1000) == b""  # closed once idle long enough
        assert trio.current_time() - started == pytest.approx(REQUEST_TIMEOUT)
        await client.aclose()


async def test_readyz_says_503_during_a_drain_and_admin_stays_up_until_the_end(
    nursery, demo_upstream
):
    _, port = demo_upstream
    proxy = Proxy(make_config(port, server={"drain_timeout": 5.0}))
    metrics = ProxyMetrics()
    metrics.bind(proxy)
    admin = AdminServer(proxy, metrics, ServerAddress(HOST, 0))
    served = trio.Event()

    async def run_proxy(task_status: trio.TaskStatus[list[ServerAddress]]) -> None:
        await serve(proxy, services=(admin.serve,), task_status=task_status)
        served.set()

    addresses = await nursery.start(run_proxy)
    assert admin.address is not None
    admin_url = f"http://{HOST}:{admin.address.port}"
    with trio.fail_after(10):
        async with httpx.AsyncClient() as client:
            assert (await client.get(admin_url + READY_PATH)).status_code == 200
            # One slow exchange keeps the drain going for a while.
            slow = await H11Client.connect(addresses[0].port)
            await slow.send(
                h11.Request(method="GET", target="/slow?delay=0.5", headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            while proxy.active_exchanges == 0:
                await trio.sleep(0.01)
            proxy.begin_drain()
            ready = await client.get(admin_url + READY_PATH)
            health = await client.get(admin_url + HEALTH_PATH)
            scrape = Scrape.parse((await client.get(admin_url + METRICS_PATH)).text)
            assert (ready.status_code, ready.text) == (503, "draining\n")
            assert health.status_code == 200
            assert scrape.value("pooled_proxy_draining") == 1
            assert scrape.value("pooled_proxy_exchanges_in_flight") == 1
            reply = await slow.read_reply()
            await slow.aclose()
            assert reply.status == 200 and reply.headers[b"connection"] == b"close"
            await served.wait()
            # Serving is over: the admin listener went with it.
            try:
                await client.get(admin_url + HEALTH_PATH)
            except httpx.ConnectError:
                pass
            else:
                raise AssertionError("admin still answering after serve() returned")


def _wait_for_line(path: Path, pattern: str, process: subprocess.Popen[bytes]) -> re.Match[str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{path.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in:\n{path.read_text()}")


def test_run_prints_its_listeners_serves_admin_and_logs_access(tmp_path):
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "pooled_proxy.daemon.demo_upstream", "--port", str(upstream_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n\n[admin]\nlisten = "127.0.0.1:0"\n\n'
        '[log]\naccess = "stdout"\nformat = "json"\n\n'
        f'[upstreams.app]\nservers = ["127.0.0.1:{upstream_port}"]\n'
    )
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proxy = subprocess.Popen([*CLI, "run", "-c", str(config)], stdout=stdout, stderr=stderr)
    try:
        listening = _wait_for_line(
            err, r"listening on http://127\.0\.0\.1:(\d+) \(HTTP/1\.1, h2c\)", proxy
        )
        admin = _wait_for_line(
            err, r"admin listening on http://127\.0\.0\.1:(\d+) \(/metrics, /healthz, /readyz\)",
            proxy,
        )  # fmt: skip
        proxy_url = f"http://127.0.0.1:{listening[1]}"
        admin_url = f"http://127.0.0.1:{admin[1]}"
        wait_for_port(upstream_port, upstream)
        assert httpx.get(admin_url + READY_PATH, timeout=5).status_code == 200
        response = httpx.get(proxy_url + "/echo?from=test", timeout=5)
        assert response.status_code == 200
        scrape = Scrape.parse(httpx.get(admin_url + METRICS_PATH, timeout=5).text)
        assert scrape.value("pooled_proxy_requests_total", upstream="app", status_class="2xx") == 1
        assert stop(proxy) == 0
    finally:
        for process in (proxy, upstream):
            if process.poll() is None:
                process.kill()
                process.wait()
    (line,) = out.read_text().splitlines()  # stdout carries the access log and nothing else
    entry = json.loads(line)
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/echo?from=test", 200)
    assert entry["bytes_out"] == len(response.content)
    assert entry["upstream_server"] == f"127.0.0.1:{upstream_port}"
