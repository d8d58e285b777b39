"""The demo upstream and the proxy as separate processes, for the benchmarks in this folder.

Each runs in its own process so a measurement sees the proxy's own cost and memory, not the
client's or the upstream's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # the proxy drains on SIGTERM; nothing is in flight by now
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def demo_upstream(*, event_interval: float = 1.0) -> Iterator[int]:
    """The built-in demo upstream on a free port; yields the port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pooled_proxy.daemon.demo_upstream",
            "--port",
            "0",
            "--event-interval",
            str(event_interval),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()  # "demo upstream listening on http://H:P/"
        if "listening on" not in line:
            raise RuntimeError(f"demo upstream did not start: {line!r}")
        yield int(line.rstrip().rstrip("/").rsplit(":", 1)[1])
    finally:
        _stop(process)


@dataclass(frozen=True)
class ProxyProcess:
    pid: int
    port: int

    def status_kib(self, field: str) -> int:
        """A ``/proc/PID/status`` figure in KiB, e.g. ``VmRSS`` or ``VmHWM`` (peak RSS)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)


@contextmanager
def proxy(upstream_port: int) -> Iterator[ProxyProcess]:
    """``pooled-proxy dev`` in front of the upstream, access log off, on a free port."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pooled_proxy",
                "dev",
                f"http://{HOST}:{upstream_port}",
                "--listen",
                f"{HOST}:{port}",
            ],
            stdout=subprocess.DEVNULL,  # the access log
            stderr=log,
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                log.seek(0)
                text = log.read().decode(errors="replace")
                if f"listening on http://{HOST}:{port}" in text:
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"proxy did not start:\n{text}")
                time.sleep(0.05)
            yield ProxyProcess(process.pid, port)
        finally:
            _stop(process)


def cpu_count_note() -> str:
    return f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}"
