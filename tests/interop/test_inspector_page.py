"""The request inspector's page in headless Chromium: it loads nothing from anywhere but the
admin port, new exchanges appear in its list as they happen, one opens with both sides of each
hop, and its Replay button sends the request again: the upstream sees it and the replay
appears in the list. A screenshot is taken at the end (set
``INSPECTOR_SCREENSHOT=docs/inspector.png`` to keep it, as the README's one was made).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from pooled_proxy.config import InspectConfig
from tests.support.helpers import make_config
from tests.support.operations import start_operated_proxy

from .browser import Browser

# A few seconds with Chromium's start: `make test` leaves it out, .ci/run runs it by name.
pytestmark = pytest.mark.slow

# "null" until the page has loaded and follows the admin's event stream.
PAGE_STATE = """!document.getElementById("rows") || !document.getElementById("live")
  .textContent.includes("live") ? "null" : JSON.stringify({
  rows: Array.from(document.querySelectorAll("#rows tr")).map((tr) => ({
    id: Number(tr.dataset.id), status: tr.dataset.status, method: tr.dataset.method,
    target: tr.dataset.target, replayOf: tr.dataset.replayOf, hidden: tr.hidden,
    text: tr.textContent,
  })),
  count: document.getElementById("count").textContent,
  detail: document.getElementById("detail").hidden ? null : {
    id: Number(document.getElementById("detail").dataset.id),
    title: document.querySelector("#detail h2")?.textContent,
    clientRequest: document.getElementById("client-request")?.textContent,
    upstreamRequest: document.getElementById("upstream-request")?.textContent,
    dropped: Array.from(document.querySelectorAll("#upstream-request .dropped"))
      .map((e) => e.textContent),
    clientResponse: document.getElementById("client-response")?.textContent,
    responseBody: document.getElementById("response-body")?.textContent,
    bodyMode: document.getElementById("response-body")?.dataset.mode,
    events: document.querySelectorAll("#response-events li").length,
    timings: document.querySelector("#detail .timing")?.textContent,
  },
  resources: performance.getEntriesByType("resource").map((e) => e.name),
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
            raise TimeoutError("the inspector page did not load")
        time.sleep(0.05)


def row(state: dict[str, Any], target: str) -> dict[str, Any]:
    return dict(next(r for r in state["rows"] if r["target"] == target and not r["replayOf"]))


async def test_inspector_page_in_chromium_lists_opens_and_replays(
    nursery, demo_upstream, tmp_path: Path
):
    upstream, port = demo_upstream
    proxy = await start_operated_proxy(
        nursery, make_config(port), inspect=InspectConfig(enabled=True)
    )
    browser = await trio.to_thread.run_sync(Browser, tmp_path / "profile")
    try:
        with trio.fail_after(60):
            await trio.to_thread.run_sync(browser.navigate, proxy.admin_url + "/inspect")
            empty = await trio.to_thread.run_sync(wait_for, browser, lambda s: True)
            # Traffic while the page is open: it arrives in the list over the event stream.
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                await client.get("/", headers={"accept": "text/html"})
                await client.post(
                    "/echo?user=ada",
                    json={"user": "ada", "roles": ["admin", "dev"], "active": True},
                    headers={"authorization": "Bearer s3cr3t", "x-request-id": "r-42"},
                )
                await client.get("/status/404")
                await client.get("/events?count=3&interval=0.05")
                await client.get(
                    "/slow?delay=0.2", headers={"connection": "keep-alive, x-hop", "x-hop": "1"}
                )
                await client.get("/status/503")
            listed = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: len(s["rows"]) == 6 and all(r["status"] for r in s["rows"]),
            )
            # Open the exchange with the hop-by-hop header, then the POST, and replay it.
            slow = row(listed, "/slow?delay=0.2")
            browser_click = f"document.querySelector('#rows tr[data-id=\"{slow['id']}\"]').click()"
            await trio.to_thread.run_sync(browser.evaluate, browser_click)
            opened_slow = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: bool(
                    s["detail"]
                    and s["detail"]["id"] == slow["id"]
                    and s["detail"].get("upstreamRequest")
                ),
            )
            events = row(listed, "/events?count=3&interval=0.05")
            await trio.to_thread.run_sync(
                browser.evaluate,
                f"document.querySelector('#rows tr[data-id=\"{events['id']}\"]').click()",
            )
            opened_events = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: bool(
                    s["detail"] and s["detail"]["id"] == events["id"] and s["detail"].get("events")
                ),
            )
            posted = row(listed, "/echo?user=ada")
            await trio.to_thread.run_sync(
                browser.evaluate,
                f"document.querySelector('#rows tr[data-id=\"{posted['id']}\"]').click()",
            )
            opened = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: bool(
                    s["detail"]
                    and s["detail"]["id"] == posted["id"]
                    and s["detail"].get("responseBody")
                ),
            )
            requests_before = upstream.stats.requests
            await trio.to_thread.run_sync(
                browser.evaluate, 'document.getElementById("replay").click()'
            )
            replayed = await trio.to_thread.run_sync(
                wait_for,
                browser,
                lambda s: (
                    any(
                        r["replayOf"] == str(posted["id"]) and r["status"] == "200"
                        for r in s["rows"]
                    )
                    and bool(
                        s["detail"]
                        and s["detail"]["id"] != posted["id"]
                        and s["detail"].get("responseBody")
                    )
                ),
            )
            requests_after = upstream.stats.requests
            # Filters: by status class, then cleared.
            filtered = await trio.to_thread.run_sync(
                browser.evaluate,
                """(() => { const f = document.getElementById("f-status"); f.value = "4xx";
                   f.dispatchEvent(new Event("input"));
                   const shown = Array.from(document.querySelectorAll("#rows tr:not([hidden])"))
                     .map((tr) => tr.dataset.target);
                   f.value = ""; f.dispatchEvent(new Event("input")); return shown; })()""",
            )
            shot = tmp_path / "inspector.png"
            png = await trio.to_thread.run_sync(browser.screenshot, shot)
    finally:
        await trio.to_thread.run_sync(browser.close)
    if keep := os.environ.get("INSPECTOR_SCREENSHOT"):
        shutil.copyfile(shot, keep)
    print(f"screenshot: {shot}")

    # Loaded with nothing from elsewhere, empty, then every exchange listed as it happened.
    assert empty["rows"] == [] and empty["detail"] is None
    assert all(url.startswith(proxy.admin_url + "/") for url in replayed["resources"])
    assert [r["status"] for r in listed["rows"]] == ["503", "200", "200", "404", "200", "200"]
    assert "s3cr3t" not in json.dumps(replayed)

    # One exchange opened: both sides of each hop, the rewriting visible.
    detail = opened_slow["detail"]
    assert "GET /slow?delay=0.2 HTTP/1.1" in detail["clientRequest"]
    assert "x-hop: 1" in detail["clientRequest"]
    assert "x-forwarded-for: 127.0.0.1" in detail["upstreamRequest"]
    assert "x-hop: 1" in detail["dropped"] and "connection: keep-alive, x-hop" in detail["dropped"]
    assert "via: 1.1 pooled-proxy" in detail["clientResponse"]
    assert "time to first byte" in detail["timings"]
    assert opened_events["detail"].get("events") == 3
    post = opened["detail"]
    assert post["bodyMode"] == "json" and '"roles": [' in post["responseBody"]  # pretty
    assert "authorization: [masked]" in post["clientRequest"]

    # Replayed: the upstream saw it, it is in the list and opened.
    assert requests_after == requests_before + 1
    [again] = [r for r in replayed["rows"] if r["replayOf"] == str(posted["id"])]
    assert again["target"] == "/echo?user=ada" and again["method"] == "POST"
    assert replayed["detail"]["id"] == again["id"]
    assert '"user": "ada"' in replayed["detail"]["responseBody"]
    assert filtered == ["/status/404"]
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
