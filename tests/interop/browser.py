"""Headless Chromium driven over the DevTools protocol (CDP), synchronously.

The calls block, so tests run them in a worker thread (``trio.to_thread.run_sync``) while the
proxy keeps serving in the trio loop. Chromium runs in its own process group and is killed
with it in ``close()``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from .servers import die_with_parent, program_version, require_program

# The brief's flags, plus what keeps a sandboxed, offline machine quiet: no first-run UI,
# no component updates or sync, no QUIC probing, a throw-away profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1000,1200",
)


def chromium_version() -> str:
    return program_version([require_program("chromium"), "--version"])


class Browser:
    def __init__(self, profile: Path, *extra_flags: str) -> None:
        chromium = require_program("chromium")
        self._log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [
                chromium,
                *CHROMIUM_FLAGS,
                *extra_flags,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self._ids = itertools.count(1)
        self._page: ClientConnection | None = None
        self._contexts = contextlib.ExitStack()
        try:
            port = self._devtools_port(profile)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                targets = json.load(answer)
            page = next(t for t in targets if t["type"] == "page")
            self._page = self._contexts.enter_context(
                connect(page["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=10)
            )
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, profile: Path, timeout: float = 30.0) -> int:
        """Chromium writes the port it picked to DevToolsActivePort in the profile."""
        deadline = time.monotonic() + timeout
        marker = profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if marker.exists():
                lines = marker.read_text().split()
                if lines:
                    return int(lines[0])
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, timeout: float = 15.0, **params: Any) -> dict[str, Any]:
        """One CDP command; events that arrive meanwhile are dropped."""
        assert self._page is not None
        ident = next(self._ids)
        self._page.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._page.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        self._page = None
        self._contexts.close()
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)
        self._log.close()
