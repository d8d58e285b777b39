"""The real daemon as a subprocess (``python -m pooled_proxy run -c FILE``) for lifecycle,
reload and worker tests: its config file, its stderr log read line by line, and a cleanup that
always kills it (and any worker it started)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tests.support.helpers import H11Client

HOST = "127.0.0.1"
# Generous: a cold interpreter on a busy CI machine; the tests' own guards start after it.
STARTUP_TIMEOUT = 30.0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the ASCII used here
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


@dataclass
class DaemonConfig:
    upstreams: dict[str, int]  # name -> port of a server on 127.0.0.1
    routes: list[dict[str, Any]] = field(default_factory=list)  # [[routes]] tables
    drain_timeout: str = "3s"
    workers: int = 1
    server: dict[str, Any] = field(default_factory=dict)  # more [server] keys
    admin: str | None = None  # [admin] listen
    log: dict[str, Any] = field(default_factory=dict)  # [log] keys over access = "off"
    admin_keys: dict[str, Any] = field(default_factory=dict)  # more [admin] keys
    upstream_keys: dict[str, Any] = field(default_factory=dict)  # more keys of every upstream

    def to_toml(self) -> str:
        server = {"listen": [f"{HOST}:0"], "workers": self.workers,
                  "drain_timeout": self.drain_timeout, **self.server}  # fmt: skip
        lines = ["[server]", *(f"{k} = {_toml(v)}" for k, v in server.items())]
        log = {"access": "off", "level": "info", **self.log}
        lines += ["", "[log]", *(f"{k} = {_toml(v)}" for k, v in log.items())]
        if self.admin is not None:
            lines += ["", "[admin]", f"listen = {_toml(self.admin)}"]
            lines += [f"{k} = {_toml(v)}" for k, v in self.admin_keys.items()]
        for name, port in self.upstreams.items():
            lines += ["", f"[upstreams.{name}]", f'servers = ["{HOST}:{port}"]']
            lines += [f"{k} = {_toml(v)}" for k, v in self.upstream_keys.items()]
        for route in self.routes:
            lines += ["", "[[routes]]", *(f"{k} = {_toml(v)}" for k, v in route.items())]
        return "\n".join(lines) + "\n"


class Daemon:
    def __init__(self, process: trio.Process, config_path: Path) -> None:
        self.process = process
        self.config_path = config_path
        self.lines: list[str] = []
        self.port = 0
        self.eof = False
        self._changed = trio.Event()

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        while chunk := await self.process.stderr.receive_some(65536):
            *complete, pending = (pending + chunk).split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
            self._changed.set()
            self._changed = trio.Event()
        await self.process.stderr.aclose()
        self.eof = True
        self._changed.set()

    def has_line(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def matches(self, pattern: str) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        return [m for line in self.lines if (m := regex.search(line))]

    async def wait_for_line(self, pattern: str, *, after: int = 0) -> re.Match[str]:
        """The first line from index ``after`` on matching the regex ``pattern``."""
        regex = re.compile(pattern)
        index = after
        while True:
            while index < len(self.lines):
                match = regex.search(self.lines[index])
                index += 1
                if match:
                    return match
            if self.eof:
                log = "\n".join(self.lines)
                raise AssertionError(f"no log line matches {pattern!r}; the log:\n{log}")
            await self._changed.wait()

    async def wait_for_count(self, pattern: str, count: int) -> list[re.Match[str]]:
        """Wait until ``count`` log lines match the regex ``pattern``."""
        while len(found := self.matches(pattern)) < count:
            if self.eof:
                log = "\n".join(self.lines)
                raise AssertionError(f"fewer than {count} lines match {pattern!r}; the log:\n{log}")
            await self._changed.wait()
        return found

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        return await self.process.wait()

    @property
    def worker_pids(self) -> set[int]:
        return {int(m[1]) for m in self.matches(r"worker \d+ started: pid (\d+)")}


@asynccontextmanager
async def running_daemon(
    nursery: trio.Nursery,
    tmp_path: Path,
    config: DaemonConfig,
    *args: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Daemon]:
    """Write the config, start ``pooled_proxy run`` (with ``env`` added to the environment),
    wait until every worker listens; on the way out, kill whatever is still running."""
    path = tmp_path / "proxy.toml"
    path.write_text(config.to_toml())
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pooled_proxy", "run", "-c", str(path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    daemon = Daemon(process, path)
    try:
        nursery.start_soon(daemon.read_stderr)
        pattern = r"lifecycle[^:]*: listening on http://127\.0\.0\.1:(\d+)"
        with trio.fail_after(STARTUP_TIMEOUT):
            await daemon.wait_for_count(pattern, config.workers)
        daemon.port = int(daemon.matches(pattern)[0][1])
        yield daemon
    except BaseException:
        # Shown by pytest with the failure: what the daemon said.
        print(f"daemon log (exit code {process.returncode}):", *daemon.lines, sep="\n")
        raise
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            for pid in daemon.worker_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await process.wait()


def serving_pid(proxy_port: int, client: H11Client, pids: set[int]) -> int | None:
    """The process among ``pids`` that holds the proxy's end of ``client``'s connection."""
    client_port = client.stream.socket.getsockname()[1]
    inode = None
    with open("/proc/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if (local_port, remote_port) == (proxy_port, client_port):
                inode = fields[9]
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


async def pids_serving(daemon: Daemon, pids: set[int], target: str, connections: int) -> set[int]:
    """Open ``connections`` keep-alive connections, GET ``target`` on each (must be 200),
    and return the pids that served them."""
    clients = [await H11Client.connect(daemon.port) for _ in range(connections)]
    try:
        served = set()
        for client in clients:
            assert (await client.request("GET", target)).status == 200
            pid = serving_pid(daemon.port, client, pids)
            assert pid is not None
            served.add(pid)
        return served
    finally:
        for client in clients:
            await client.aclose()
