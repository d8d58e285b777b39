"""The daemon and the signals an operator sends it, as a real process: SIGUSR1 reopens the
access log (logrotate), SIGUSR2 is ignored, and systemd's readiness protocol over a real unix
datagram socket (``NOTIFY_SOCKET``)."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import trio

from tests.support.daemon import Daemon, DaemonConfig, running_daemon
from tests.support.helpers import H11Client

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="memfd workers and SO_PASSCRED"
)

CLIENTS = 4


class Traffic:
    """Keep-alive clients sending GET /echo?n=N with a unique N until told to stop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent: set[int] = set()
        self._next = 0
        self._stop = trio.Event()
        self._progress = trio.Event()

    async def client(self) -> None:
        client = await H11Client.connect(self.port)
        try:
            while not self._stop.is_set():
                n = self._next
                self._next += 1
                assert (await client.request("GET", f"/echo?n={n}")).status == 200
                self.sent.add(n)
                self._progress.set()
                self._progress = trio.Event()
        finally:
            await client.aclose()

    async def until_sent(self, count: int) -> None:
        while len(self.sent) < count:
            await self._progress.wait()

    def stop(self) -> None:
        self._stop.set()


def logged_numbers(path: Path) -> list[int]:
    return [int(json.loads(line)["path"].split("n=")[1]) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_reopens_the_access_log_under_traffic_and_loses_no_line(
    nursery, demo_upstream, tmp_path, workers
):
    _, upstream_port = demo_upstream
    log = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    config = DaemonConfig(
        upstreams={"app": upstream_port}, workers=workers, log={"access": str(log)}
    )
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            traffic = Traffic(daemon.port)
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(traffic.client)
                await traffic.until_sent(100)
                log.rename(rotated)  # what logrotate does, then it signals the proxy
                daemon.send_signal(signal.SIGUSR1)
                # Every process that writes the log reopens it (the supervisor passes it on).
                await daemon.wait_for_count(r"access log reopened: ", workers)
                await traffic.until_sent(len(traffic.sent) + 100)
                traffic.stop()
            daemon.send_signal(signal.SIGTERM)  # the drain writes the last lines
            assert await daemon.wait() == 0
    before, after = logged_numbers(rotated), logged_numbers(log)
    assert before and after
    assert sorted(before + after) == sorted(traffic.sent)  # every line once, none lost
    assert not daemon.has_line("Traceback")


async def test_sigusr2_is_ignored_and_sigusr1_without_a_log_file_is_harmless(
    nursery, demo_upstream, tmp_path
):
    _, upstream_port = demo_upstream
    config = DaemonConfig(upstreams={"app": upstream_port})  # access = "off"
    async with running_daemon(nursery, tmp_path, config) as daemon:
        with trio.fail_after(20):
            for signum, said in ((signal.SIGUSR2, "ignored"), (signal.SIGUSR1, "no log file")):
                daemon.send_signal(signum)
                await daemon.wait_for_line(f"{signum.name}: {said}")
                client = await H11Client.connect(daemon.port)
                assert (await client.request("GET", "/echo")).status == 200
                await client.aclose()
            assert daemon.process.returncode is None


class NotifySocket:
    """A unix datagram socket standing in for systemd's ``NOTIFY_SOCKET``."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.path = Path()

    async def bind(self, path: Path) -> None:
        self.path = path
        await self.sock.bind(str(path))

    async def message(self) -> dict[str, str]:
        data = await self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.mark.parametrize("workers", [1, 2])
async def test_sd_notify_ready_reloading_and_stopping(nursery, demo_upstream, tmp_path, workers):
    _, upstream_port = demo_upstream
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await _sd_notify_scenario(nursery, tmp_path, upstream_port, workers, NotifySocket(sock))


async def _sd_notify_scenario(nursery, tmp_path, upstream_port, workers, notify) -> None:
    await notify.bind(tmp_path / "notify")
    config = DaemonConfig(upstreams={"app": upstream_port}, workers=workers)
    env = {"NOTIFY_SOCKET": str(notify.path)}
    async with running_daemon(nursery, tmp_path, config, env=env) as daemon:
        with trio.fail_after(20):
            ready = await notify.message()
            assert ready["READY"] == "1"
            assert f"127.0.0.1:{daemon.port}" in ready["STATUS"]
            # READY=1 comes once every worker listens. The processes share one stderr pipe,
            # so the order of its lines is the order things happened in.
            await daemon.wait_for_count(r"listening on http://", workers)
            if workers > 1:
                await daemon.wait_for_line(r"READY=1 sent to systemd")
                order = [line for line in daemon.lines if "listening on" in line or "READY" in line]
                assert "READY=1" in order[-1] and len(order) == workers + 1, order
            await assert_serves(daemon)

            daemon.send_signal(signal.SIGHUP)
            reloading = await notify.message()
            assert reloading["RELOADING"] == "1"
            assert abs(int(reloading["MONOTONIC_USEC"]) - monotonic_usec()) < 10_000_000
            assert (await notify.message())["READY"] == "1"

            daemon.send_signal(signal.SIGTERM)
            assert await notify.message() == {"STOPPING": "1"}
            assert await daemon.wait() == 0
        # Nothing more: each worker's own READY/RELOADING stays with the supervisor.
        with trio.move_on_after(0.1) as nothing_more:
            extra = await notify.message()
        assert nothing_more.cancelled_caught, extra


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def assert_serves(daemon: Daemon) -> None:
    client = await H11Client.connect(daemon.port)
    try:
        assert (await client.request("GET", "/echo")).status == 200
    finally:
        await client.aclose()
