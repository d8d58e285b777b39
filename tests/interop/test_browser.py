"""A real browser in front of the proxy: headless Chromium loads a page through it.

The page (served by uvicorn + Starlette, tests/interop/apps/asgi_app.py) opens an
``EventSource`` and makes a ``fetch`` POST; both write what they receive into the DOM. The
test reads the DOM over the DevTools protocol while the events are still coming (so it sees
them arrive live), then takes a screenshot, and fails if fewer events arrived than the
upstream sent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support.helpers import make_config, start_proxy

from .browser import Browser
from .conftest import TlsSetup, start_tls_proxy

pytestmark = pytest.mark.slow

EVENTS = 10
INTERVAL = 0.3

PAGE_STATE = """JSON.stringify({
  protocol: document.getElementById("protocol")?.textContent ?? null,
  echo: document.getElementById("echo")?.textContent ?? null,
  done: document.getElementById("done")?.textContent ?? null,
  resources: performance.getEntriesByType("resource").map((e) => [new URL(e.name).pathname, e.nextHopProtocol]),
  events: Array.from(document.querySelectorAll("#events li")).map((li) => ({
    n: Number(li.dataset.n), sent: Number(li.dataset.sent), received: Number(li.dataset.received),
  })),
})"""


@dataclass
class PageRun:
    state: dict[str, Any]
    counts_seen: list[int] = field(default_factory=list)  # events in the DOM at each poll
    screenshot: bytes = b""


def load_page(
    profile: Path, url: str, screenshot: Path, *flags: str, timeout: float = 30.0
) -> PageRun:
    browser = Browser(profile, *flags)
    try:
        browser.navigate(url)
        run = PageRun(state={})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run.state = json.loads(browser.evaluate(PAGE_STATE) or "{}")
            run.counts_seen.append(len(run.state.get("events", [])))
            if run.state.get("done") and run.state.get("echo") not in (None, "..."):
                break
            time.sleep(0.05)
        run.screenshot = browser.screenshot(screenshot)
        return run
    finally:
        browser.close()


def assert_page_worked(run: PageRun, protocol: str) -> None:
    state = run.state
    events = state["events"]
    assert len(events) >= EVENTS, f"only {len(events)} of {EVENTS} events reached the page"
    assert [e["n"] for e in events] == list(range(1, EVENTS + 1))
    assert state["done"] == f"done {EVENTS}"
    assert state["echo"] == "hello from the browser"
    assert state["protocol"] == protocol  # the page itself
    assert ["/echo", protocol] in state["resources"], state["resources"]  # the fetch
    # Live: the DOM was seen part-filled, and the first event was on the page before the
    # upstream sent the last one.
    assert any(0 < count < EVENTS for count in run.counts_seen), run.counts_seen
    assert events[0]["received"] < events[-1]["sent"], events
    assert run.screenshot.startswith(b"\x89PNG") and len(run.screenshot) > 5000


async def test_chromium_eventsource_and_fetch_over_http11(nursery, uvicorn_server, tmp_path: Path):
    proxy = await start_proxy(nursery, make_config(uvicorn_server.port))
    shot = tmp_path / "chromium-h1.png"
    with trio.fail_after(60):
        run = await trio.to_thread.run_sync(
            load_page,
            tmp_path / "profile",
            f"{proxy.url}/page?count={EVENTS}&interval={INTERVAL}",
            shot,
        )
    print(f"screenshot: {shot}")
    assert_page_worked(run, "http/1.1")


async def test_chromium_eventsource_and_fetch_over_h2_with_tls(
    nursery, uvicorn_server, tls_setup: TlsSetup, tmp_path: Path
):
    # The trustme CA is not in Chromium's store; the brief allows skipping verification.
    proxy = await start_tls_proxy(nursery, uvicorn_server.port, tls_setup)
    shot = tmp_path / "chromium-h2.png"
    with trio.fail_after(60):
        run = await trio.to_thread.run_sync(
            load_page,
            tmp_path / "profile",
            f"{proxy.tls_url}/page?count={EVENTS}&interval={INTERVAL}",
            shot,
            "--ignore-certificate-errors",
        )
    print(f"screenshot: {shot}")
    assert_page_worked(run, "h2")
