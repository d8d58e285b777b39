"""Soak: minutes of good traffic mixed with abuse, then check the proxy is where it started.

    .venv/bin/python bench/soak.py [--duration 120] [--good 8] [--slowloris 20]

The proxy runs as its own process (``pooled-proxy run`` with a config written here) in
front of two upstreams: the demo upstream (own process) for good traffic, and the
fault-injection upstream of the tests (``tests/support/faulty_upstream.py``, in this process) for
failures. For ``--duration`` seconds these clients run at once:

- good: keep-alive clients doing GET /echo, POST /echo (4 KiB), GET /bytes/65536; and
  HTTP/2 (h2c) clients running 10 concurrent streams per connection;
- h2 resets: HTTP/2 clients that reset half their streams mid-response, then drop the socket;
- slowloris: heads dripped one byte a second (cut by header_timeout with a 408);
- slow bodies: half a request body, then silence (cut by body_timeout with a 408);
- resets: a request, then a TCP reset before or while the response comes;
- upstream faults: /fault/<mode> for reset-mid-body, garbage, hang, half-chunked, drip,
  bad-response, close-before-head, and endless bodies read a little then dropped;
- smuggling: CL+TE, repeated Content-Length, obs-fold, bare LF (each a 400 and a close).

It prints requests served, outcomes by kind, and the proxy's open file descriptors and RSS
at the start (after a warm-up) and at the end (after the same settling pause, so keep-alive
connections and idle pooled connections have timed out both times). The bar: a flat fd count
and a flat RSS. Exit status 1 if the fd count grew or RSS grew by more than ``--rss-slack``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.faulty_upstream import FaultyUpstream  # after the sys.path line above

HOST = "127.0.0.1"
SETTLE = 5.0  # > keepalive_timeout and idle_timeout below: idle connections are gone by then
CONFIG = """\
[server]
listen = ["{host}:0"]
header_timeout = "4s"
keepalive_timeout = "2s"
body_timeout = "3s"
write_timeout = "3s"
max_connections = 4000

[log]
access = "off"
level = "info"

[upstreams.good]
servers = ["{host}:{demo}"]
idle_timeout = "2s"
max_connections = 64

[upstreams.fault]
servers = ["{host}:{faulty}"]
idle_timeout = "2s"
response_header_timeout = "2s"
read_timeout = "2s"
max_connections = 64

[[routes]]
path_prefix = "/fault"
upstream = "fault"
strip_prefix = true

[[routes]]
path_prefix = "/"
upstream = "good"
"""
FAULT_MODES = [
    "reset-mid-body", "garbage", "hang", "half-chunked", "drip", "close-before-head",
    "bad-response?kind=cl-te", "bad-response?kind=obs-fold", "reset-before-head",
]  # fmt: skip
SMUGGLING = [
    b"POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
    b"GET /echo HTTP/1.1\r\nHost: s\r\nX-A: a\r\n b\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nHost: s\r\nX-A: a\nContent-Length: 40\r\n\r\n",
]
NET_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class Proxy:
    """The proxy process: its pid, port, and what /proc says about it."""

    def __init__(self, demo_port: int, faulty_port: int, workdir: Path) -> None:
        config = workdir / "soak.toml"
        config.write_text(CONFIG.format(host=HOST, demo=demo_port, faulty=faulty_port))
        self.log_path = workdir / "proxy.log"
        self._log = self.log_path.open("wb")  # a file, not a pipe: nobody must drain it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pooled_proxy", "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        self.port = 0

    async def started(self) -> None:
        with trio.fail_after(20):
            while True:
                match = re.search(
                    rf"listening on http://{HOST}:(\d+)", self.log_path.read_text(errors="replace")
                )
                if match:
                    self.port = int(match.group(1))
                    return
                if self.process.poll() is not None:
                    raise RuntimeError(f"proxy exited:\n{self.log_path.read_text()}")
                await trio.sleep(0.05)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_kib(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise KeyError("VmRSS")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


def start_demo() -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pooled_proxy.daemon.demo_upstream",
            "--port",
            "0",
            "--event-interval",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()  # "demo upstream listening on http://H:P/"
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"demo upstream did not start: {line!r}")
    return process, int(line.rstrip().rstrip("/").rsplit(":", 1)[1])


# -- clients -------------------------------------------------------------------------------


def _status(data: bytes) -> str:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return match.group(1).decode() if match else "no-status"


async def _read_response(stream: trio.SocketStream, buffer: bytearray) -> tuple[str, bool]:
    """One response off a keep-alive connection: (status, complete). Content-Length or
    chunked bodies only, which is what the upstreams here send."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return ("closed-before-head" if not buffer else _status(bytes(buffer))), False
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    del buffer[:]
    buffer += rest
    status = _status(head)
    lower = head.lower()
    match = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    if match:
        need = int(match.group(1))
        while len(buffer) < need:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return status, False
            buffer += chunk
        del buffer[:need]
        return status, True
    if b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            while b"\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return status, False
                buffer += chunk
            line, _, _ = bytes(buffer).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            need = len(line) + 2 + size + 2
            while len(buffer) < need:  # (a last chunk without trailers: "0\r\n\r\n")
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return status, False
                buffer += chunk
            del buffer[:need]
            if size == 0:
                return status, True
    return status, True


class Soak:
    def __init__(self, port: int, deadline: float) -> None:
        self.port = port
        self.deadline = deadline
        self.outcomes: Counter[str] = Counter()
        self.served = 0  # complete responses the clients read
        self.good_served = 0  # of which 2xx to the good clients

    def running(self) -> bool:
        return trio.current_time() < self.deadline

    def count(self, kind: str, status: str, complete: bool = True) -> None:
        self.outcomes[f"{kind}: {status}{'' if complete else ' (cut)'}"] += 1
        if complete and status != "no-status" and not status.startswith("closed"):
            self.served += 1
            if kind in ("good", "h2 good") and status.startswith("2"):
                self.good_served += 1

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(HOST, self.port)

    async def good(self) -> None:
        requests = [
            b"GET /echo?x=1 HTTP/1.1\r\nHost: soak\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: soak\r\nContent-Length: 4096\r\n\r\n" + b"p" * 4096,
            b"GET /bytes/65536 HTTP/1.1\r\nHost: soak\r\n\r\n",
        ]
        while self.running():
            try:
                async with await self.connect() as stream:
                    buffer = bytearray()
                    for _ in range(random.randint(1, 50)):
                        if not self.running():
                            break
                        await stream.send_all(random.choice(requests))
                        status, complete = await _read_response(stream, buffer)
                        self.count("good", status, complete)
                        if not complete:
                            break
            except NET_ERRORS as exc:
                self.outcomes[f"good: {type(exc).__name__}"] += 1

    async def _h2_streams(self, kind: str, path: bytes, *, reset_half: bool) -> None:
        """One h2c connection with 10 concurrent GETs; with ``reset_half``, every other stream
        is reset at its first DATA and the socket dropped before the rest end."""
        async with await self.connect() as stream:
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            conn.initiate_connection()
            pending: dict[int, bytes] = {}
            for i in range(10):
                sid = conn.get_next_available_stream_id()
                request = [
                    (b":method", b"GET"),
                    (b":path", path),
                    (b":scheme", b"http"),
                    (b":authority", b"soak"),
                ]
                conn.send_headers(sid, request, end_stream=True)
                pending[sid] = b"?"
            await stream.send_all(conn.data_to_send())
            while pending:
                data = await stream.receive_some(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        pending[event.stream_id] = dict(event.headers).get(b":status", b"?")
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                        if reset_half and event.stream_id % 4 == 1 and event.stream_id in pending:
                            conn.reset_stream(event.stream_id)
                            del pending[event.stream_id]
                            self.outcomes[f"{kind}: reset by us"] += 1
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in pending:
                        self.count(kind, pending.pop(event.stream_id).decode())
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id in pending:
                        del pending[event.stream_id]
                        self.outcomes[f"{kind}: reset by the proxy"] += 1
                await stream.send_all(conn.data_to_send())
                if reset_half and len(pending) <= 3:
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.outcomes[f"{kind}: dropped with streams open"] += 1
                    return
            for _ in pending:
                self.count(kind, "unfinished", False)

    async def h2_good(self) -> None:
        while self.running():
            try:
                await self._h2_streams("h2 good", b"/bytes/20000", reset_half=False)
            except NET_ERRORS as exc:
                self.outcomes[f"h2 good: {type(exc).__name__}"] += 1

    async def h2_resetter(self) -> None:
        while self.running():
            try:
                await self._h2_streams("h2 resets", b"/bytes/1000000", reset_half=True)
            except NET_ERRORS as exc:
                self.outcomes[f"h2 resets: {type(exc).__name__}"] += 1
            await trio.sleep(0.05)

    async def slowloris(self) -> None:
        head = b"GET /echo HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
        while self.running():
            try:
                async with await self.connect() as stream:
                    reply = b""
                    for i in range(len(head)):
                        await stream.send_all(head[i : i + 1])
                        with trio.move_on_after(1.0):
                            reply = await stream.receive_some(65536) or b"closed"
                        if reply or not self.running():
                            break
                    if reply:
                        self.count("slowloris", _status(reply) if reply != b"closed" else "closed")
            except NET_ERRORS as exc:
                self.outcomes[f"slowloris: {type(exc).__name__}"] += 1

    async def slow_body(self) -> None:
        while self.running():
            try:
                async with await self.connect() as stream:
                    await stream.send_all(
                        b"POST /echo HTTP/1.1\r\nHost: soak\r\nContent-Length: 100\r\n\r\n"
                        + b"b" * 10
                    )
                    # /echo answers at once and streams the body back, so the 408 cannot
                    # replace a head already sent: the response is cut at body_timeout.
                    with trio.move_on_after(10):
                        status, complete = await _read_response(stream, bytearray())
                        self.count("slow-body", status, complete)
            except NET_ERRORS as exc:
                self.outcomes[f"slow-body: {type(exc).__name__}"] += 1

    async def resetter(self) -> None:
        targets = [b"/bytes/1000000", b"/slow?delay=0.2", b"/echo", b"/events?count=50"]
        while self.running():
            try:
                stream = await self.connect()
                await stream.send_all(
                    b"GET " + random.choice(targets) + b" HTTP/1.1\r\nHost: soak\r\n\r\n"
                )
                if random.random() < 0.5:
                    with trio.move_on_after(random.random() * 0.3):
                        await stream.receive_some(random.randint(1, 65536))
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await stream.aclose()
                self.outcomes["reset: sent"] += 1
            except NET_ERRORS as exc:
                self.outcomes[f"reset: {type(exc).__name__}"] += 1
            await trio.sleep(0.01)

    async def faults(self) -> None:
        while self.running():
            mode = random.choice([*FAULT_MODES, "endless"])
            try:
                async with await self.connect() as stream:
                    await stream.send_all(
                        b"GET /fault/" + mode.encode() + b" HTTP/1.1\r\nHost: soak\r\n\r\n"
                    )
                    if mode == "endless":
                        got = 0
                        while got < 300_000 and (chunk := await stream.receive_some(65536)):
                            got += len(chunk)
                        self.count("fault endless", "read-then-dropped")
                        continue
                    with trio.move_on_after(10):
                        status, complete = await _read_response(stream, bytearray())
                        self.count(f"fault {mode.split('?')[0]}", status, complete)
            except NET_ERRORS as exc:
                self.outcomes[f"fault {mode}: {type(exc).__name__}"] += 1

    async def smuggler(self) -> None:
        while self.running():
            try:
                async with await self.connect() as stream:
                    await stream.send_all(random.choice(SMUGGLING))
                    reply = b""
                    with trio.move_on_after(10):
                        while chunk := await stream.receive_some(65536):
                            reply += chunk
                    self.count("smuggling", _status(reply))
            except NET_ERRORS as exc:
                self.outcomes[f"smuggling: {type(exc).__name__}"] += 1
            await trio.sleep(0.02)

    async def run(self, args: argparse.Namespace) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(args.good):
                nursery.start_soon(self.good)
            for _ in range(args.h2):
                nursery.start_soon(self.h2_good)
            for _ in range(args.slowloris):
                nursery.start_soon(self.slowloris)
            for _ in range(args.abusers):
                nursery.start_soon(self.slow_body)
                nursery.start_soon(self.resetter)
                nursery.start_soon(self.faults)
                nursery.start_soon(self.smuggler)
                nursery.start_soon(self.h2_resetter)


async def main(args: argparse.Namespace) -> int:
    faulty = FaultyUpstream(drip_interval=0.02)  # a whole dripped head within 2 s
    demo, demo_port = start_demo()
    workdir = Path(tempfile.mkdtemp(prefix="pooled-proxy-soak-"))
    proxy: Proxy | None = None
    try:
        async with trio.open_nursery() as nursery:
            faulty_port = await nursery.start(faulty.serve)
            proxy = Proxy(demo_port, faulty_port, workdir)
            await proxy.started()
            print(f"proxy pid {proxy.process.pid} on {HOST}:{proxy.port}; warm-up {args.warmup:g}s")
            warm = Soak(proxy.port, trio.current_time() + args.warmup)
            await warm.run(args)
            await trio.sleep(SETTLE)
            fds_start, rss_start = proxy.fds(), proxy.rss_kib()
            print(
                f"start: {fds_start} fds, RSS {rss_start / 1024:.1f} MiB; soaking {args.duration:g}s"
            )
            started = time.monotonic()
            soak = Soak(proxy.port, trio.current_time() + args.duration)
            await soak.run(args)
            elapsed = time.monotonic() - started
            await trio.sleep(SETTLE)
            fds_end, rss_end = proxy.fds(), proxy.rss_kib()
            nursery.cancel_scope.cancel()
    finally:
        code = proxy.stop() if proxy is not None else None
        demo.terminate()
        demo.wait()
    print(
        f"\nrequests served: {soak.good_served} good ones ({soak.good_served / elapsed:.0f}/s), "
        f"{soak.served} complete answers in all, in {elapsed:.0f}s"
    )
    print("outcomes by kind:")
    for kind, count in sorted(soak.outcomes.items()):
        print(f"  {count:8d}  {kind}")
    print(f"upstream faults injected: {sum(faulty.faults.values())} ({dict(faulty.faults)})")
    print(f"proxy fds: start {fds_start}, end {fds_end} ({fds_end - fds_start:+d})")
    growth = (rss_end - rss_start) / rss_start
    print(
        f"proxy RSS: start {rss_start / 1024:.1f} MiB, end {rss_end / 1024:.1f} MiB ({growth:+.1%})"
    )
    errors = len(
        re.findall(r"Traceback|ERROR", (workdir / "proxy.log").read_text(errors="replace"))
    )
    print(
        f"proxy log: {errors} error/traceback line(s) ({workdir / 'proxy.log'}); exit code {code}"
    )
    flat = fds_end <= fds_start and growth <= args.rss_slack and errors == 0
    print("FLAT" if flat else "NOT FLAT")
    return 0 if flat else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=120.0, help="seconds of soak (default 120)"
    )
    parser.add_argument(
        "--warmup", type=float, default=15.0, help="seconds of the same mix before the start sample"
    )
    parser.add_argument("--good", type=int, default=8, help="keep-alive clients with good traffic")
    parser.add_argument("--h2", type=int, default=2, help="HTTP/2 clients with good traffic")
    parser.add_argument("--slowloris", type=int, default=20, help="slowloris connections")
    parser.add_argument("--abusers", type=int, default=2, help="clients of each abusive kind")
    parser.add_argument(
        "--rss-slack", type=float, default=0.10, help="RSS growth tolerated (default 10%%)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args()))
