"""The proxy's memory while 1 GiB streams through it each way, and with a slow client.

    .venv/bin/python bench/stream_memory.py [--mib 1024]

The demo upstream and the proxy run as their own processes; this script is the client. It
downloads ``--mib`` MiB (``/bytes/N``), uploads as much to ``/echo`` while reading the echo
back, then reads a large download slowly (a client at ~6 MiB/s). The proxy's RSS is sampled
from ``/proc/PID/status`` throughout; its peak (VmHWM) must stay under 100 MiB, or the script
exits 1. Bodies are never held whole: backpressure makes the slow client slow the upstream.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import h11
from _servers import HOST, ProxyProcess, cpu_count_note, demo_upstream, proxy

MIB = 1024 * 1024
LIMIT_MIB = 100
BLOCK = bytes(range(256)) * 4096  # 1 MiB


class RssSampler:
    """Samples the proxy's VmRSS every 20 ms on a thread; ``peak()`` since the last reset."""

    def __init__(self, process: ProxyProcess) -> None:
        self.process = process
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.max_kib = max(self.max_kib, self.process.status_kib("VmRSS"))

    @contextmanager
    def running(self) -> Iterator[RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def reset(self) -> None:
        self.max_kib = self.process.status_kib("VmRSS")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_response(
    sock: socket.socket, *, chunk: int = MIB, pause: float = 0.0, stop_after: float | None = None
) -> int:
    """Read a response (h11 decodes the framing); the body's size in bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="GET", target="/", headers=[("host", "bench")])
    )  # for h11's state only
    body = 0
    started = time.monotonic()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(chunk))
            if pause:
                time.sleep(pause)
            if stop_after is not None and time.monotonic() - started > stop_after:
                return body
        elif isinstance(event, h11.Response):
            if event.status_code != 200:
                raise RuntimeError(f"unexpected answer: {event.status_code}")
        elif isinstance(event, h11.Data):
            body += len(event.data)
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return body


def download(port: int, size: int) -> int:
    with _connect(port) as sock:
        sock.sendall(
            f"GET /bytes/{size} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
        )
        return _read_response(sock)


def upload(port: int, size: int) -> int:
    """POST ``size`` bytes to /echo while reading the echo back; the echoed size."""
    with _connect(port) as sock:
        head = f"POST /echo HTTP/1.1\r\nHost: bench\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())

        def send() -> None:
            left = size
            while left:
                piece = min(left, len(BLOCK))
                sock.sendall(BLOCK[:piece])
                left -= piece

        sender = threading.Thread(target=send)
        sender.start()
        echoed = _read_response(sock)
        sender.join()
        return echoed


def slow_download(port: int, seconds: float) -> int:
    """A client that reads 64 KiB every 10 ms from an endless-looking download."""
    with _connect(port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            f"GET /bytes/{64 * 1024 * MIB} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
        )
        return _read_response(sock, chunk=64 * 1024, pause=0.01, stop_after=seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mib", type=int, default=1024, help="MiB to move each way (default 1024 = 1 GiB)"
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=3.0, help="how long the slow client reads"
    )
    args = parser.parse_args()
    size = args.mib * MIB

    rows: list[tuple[str, int, float, float]] = []
    with demo_upstream() as upstream_port, proxy(upstream_port) as process:
        download(process.port, 1024)  # warm-up: imports, first upstream connection
        start_rss = process.status_kib("VmRSS")
        with RssSampler(process).running() as sampler:
            for name, run in (
                (f"download {args.mib} MiB", lambda: download(process.port, size)),
                (f"upload {args.mib} MiB (echoed)", lambda: upload(process.port, size)),
                (
                    f"slow client {args.slow_seconds:g} s",
                    lambda: slow_download(process.port, args.slow_seconds),
                ),
            ):
                sampler.reset()
                started = time.monotonic()
                moved = run()
                elapsed = time.monotonic() - started
                if not name.startswith("slow") and moved != size:
                    raise RuntimeError(f"{name}: got {moved} bytes, expected {size}")
                rows.append((name, moved, elapsed, sampler.max_kib / 1024))
        peak_mib = process.status_kib("VmHWM") / 1024

    print(f"Streaming memory of the proxy process ({cpu_count_note()})")
    header = f"{'phase':<26} {'bytes':>14} {'seconds':>8} {'MiB/s':>8} {'max RSS MiB':>12}"
    print(header)
    print("-" * len(header))
    for name, moved, elapsed, rss in rows:
        print(f"{name:<26} {moved:>14,} {elapsed:>8.2f} {moved / MIB / elapsed:>8.1f} {rss:>12.1f}")
    print(
        f"proxy RSS after start-up: {start_rss / 1024:.1f} MiB; peak RSS (VmHWM): {peak_mib:.1f} MiB "
        f"(limit {LIMIT_MIB} MiB: {'ok' if peak_mib < LIMIT_MIB else 'OVER'})"
    )
    return 0 if peak_mib < LIMIT_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
