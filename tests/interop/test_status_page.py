"""The admin's status page in headless Chromium: it loads nothing from anywhere but the admin
port, shows the upstreams of the config, and its numbers and charts move while traffic
flows. The DOM is read over the DevTools protocol; a screenshot is taken at the end (set
``STATUS_PAGE_SCREENSHOT=docs/status-page.png`` to keep it, as the README's one was made).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from tests.support.faulty_upstream import refused_port
from tests.support.h2client import H2Client
from tests.support.helpers import H11Client, two_upstreams
from tests.support.operations import start_operated_proxy

from .browser import Browser

# A few seconds with Chromium's start: `make test` leaves it out, .ci/run runs it by name.
pytestmark = pytest.mark.slow

SAMPLE_INTERVAL = 0.2

# "null" until the page has loaded (right after Page.navigate the document may be a blank one).
PAGE_STATE = """document.readyState !== "complete" || !document.getElementById("upstreams")
? "null" : JSON.stringify({
  updates: Number(document.body.dataset.updates || 0),
  live: document.getElementById("live").textContent,
  requests: Number(document.getElementById("requests-total").dataset.value),
  errors: Number(document.getElementById("errors-total").dataset.value),
  clients: Number(document.getElementById("clients").dataset.value),
  streams: Number(document.getElementById("event-streams").dataset.value),
  generation: document.getElementById("generation").textContent,
  state: document.getElementById("drain-state").textContent,
  chart: Object.assign({}, document.getElementById("chart-requests").dataset),
  errorChart: Object.assign({}, document.getElementById("chart-errors").dataset),
  resources: performance.getEntriesByType("resource").map((e) => e.name),
  upstreams: Array.from(document.querySelectorAll("section.upstream")).map((s) => ({
    name: s.dataset.upstream,
    requests: Number(s.querySelector("[data-field=requests]").dataset.value),
    servers: Array.from(s.querySelectorAll("tr[data-server]")).map((r) => ({
      address: r.dataset.server,
      health: r.dataset.health,
      requests: Number(r.querySelector("[data-field=requests]").dataset.value),
      in_use: Number(r.querySelector("[data-field=in_use]").dataset.value),
      queued: Number(r.querySelector("[data-field=queued]").dataset.value),
    })),
  })),
})"""


def wait_for(
    browser: Browser, done: Callable[[dict[str, Any]], bool], timeout: float = 15.0
) -> dict[str, Any]:
    """Read the page's state until ``done`` says so; the last state read if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        state: dict[str, Any] | None = json.loads(browser.evaluate(PAGE_STATE))
        if state is not None and (done(state) or time.monotonic() > deadline):
            return state
        if time.monotonic() > deadline:
            raise TimeoutError("the status page did not load")
        time.sleep(0.05)


def server(state: dict[str, Any], upstream: str, address: str) -> dict[str, Any]:
    [section] = [u for u in state["upstreams"] if u["name"] == upstream]
    [row] = [s for s in section["servers"] if s["address"] == address]
    return dict(row)


async def test_status_page_in_chromium_moves_with_traffic(nursery, demo_upstream, tmp_path: Path):
    _, good = demo_upstream
    dead = await refused_port()
    config = two_upstreams(
        (good, dead), (good,), max_connections=3, max_fails=1, queue_timeout=60.0
    )
    config = replace(config, path=Path("/etc/pooled-proxy/proxy.toml"))
    proxy = await start_operated_proxy(nursery, config, sample_interval=SAMPLE_INTERVAL)
    good_address, dead_address = f"127.0.0.1:{good}", f"127.0.0.1:{dead}"

    async def get(target: str, count: int = 1) -> None:
        async with await H11Client.connect(proxy.running.port) as client:
            for _ in range(count):
                await client.request("GET", target)

    async def hold(target: str) -> None:
        """A request that stays in flight until the test ends."""
        async with await H11Client.connect(proxy.running.port) as client:
            await client.send(
                h11.Request(method="GET", target=target, headers=[("host", "x")]),
                h11.EndOfMessage(),
            )
            await trio.sleep_forever()

    browser = await trio.to_thread.run_sync(Browser, tmp_path / "profile")
    try:
        with trio.fail_after(60):
            await trio.to_thread.run_sync(browser.navigate, proxy.admin_url + "/")
            before = await trio.to_thread.run_sync(wait_for, browser, lambda s: s["updates"] >= 2)
            # Traffic: in bursts across a few samples, some of it answered 503 by the app.
            for burst in (4, 12, 8, 16, 6):
                await get("/echo", burst)
                await get("/status/503", burst // 4)
                await trio.sleep(SAMPLE_INTERVAL)
            await get("/other/echo", 5)
            # Live state for the page to show: a full pool and a queue, an event stream, h2.
            for _ in range(5):
                nursery.start_soon(hold, "/slow?delay=30")
            nursery.start_soon(hold, "/other/events?count=10000")
            h2 = await H2Client.connect(proxy.running.port)
            after = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: (
                    s["requests"] >= 62
                    and s["streams"] == 1
                    and server(s, "app", good_address)["queued"] == 2
                ),
            )
            shot = tmp_path / "status-page.png"
            png = await trio.to_thread.run_sync(browser.screenshot, shot)
            await h2.stream.aclose()
    finally:
        await trio.to_thread.run_sync(browser.close)
    if keep := os.environ.get("STATUS_PAGE_SCREENSHOT"):
        shutil.copyfile(shot, keep)
    print(f"screenshot: {shot}")

    # Loaded with nothing from elsewhere, and following the admin's event stream.
    assert before["live"] == "live", before
    assert all(url.startswith(proxy.admin_url + "/") for url in before["resources"]), before
    assert [u["name"] for u in before["upstreams"]] == ["app", "other"]
    assert {s["address"] for s in before["upstreams"][0]["servers"]} == {good_address, dead_address}
    assert before["requests"] == 0 and before["generation"] == "1"
    assert before["state"] == "serving"

    # The numbers moved: totals, the per-upstream and per-server counts, health, pool, charts.
    assert after["requests"] == 62 and after["errors"] == 11, after
    assert after["clients"] >= 7  # 5 held + 1 stream + h2
    app = server(after, "app", good_address)
    assert (app["in_use"], app["queued"]) == (3, 2)
    assert server(after, "app", dead_address)["health"] == "down"  # refused once: max_fails 1
    assert server(after, "other", good_address)["requests"] == 6
    assert int(after["chart"]["points"]) > int(before["chart"]["points"])
    assert float(after["chart"]["max"]) > 0 and float(after["errorChart"]["max"]) > 0
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
