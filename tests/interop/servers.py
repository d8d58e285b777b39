"""Third-party programs as subprocesses on 127.0.0.1: start, wait until they accept, kill.

Every server runs in its own process group (``start_new_session``) so that killing it also
kills the workers it forked (gunicorn, nginx). Output goes to a log file, never a pipe that
could fill up and stall the server; the log is shown when a server fails to start.

A test whose program is not installed is skipped (``make interop-deps`` installs them all);
with ``POOLED_PROXY_REQUIRE_INTEROP=1``, which CI (``.ci/run``) sets, it fails instead, so
that CI can never pass by skipping.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]  # the repository: subprocesses import tests.interop.*
APPS = Path(__file__).resolve().parent / "apps"
START_TIMEOUT = 20.0
REQUIRE_ENV = "POOLED_PROXY_REQUIRE_INTEROP"
NOT_INSTALLED = " is not installed"  # a skip reason "NAME is not installed ..." (conftest.py)


def interop_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def require_program(name: str) -> str:
    """The path of an installed program; else skip the test, or fail it when
    POOLED_PROXY_REQUIRE_INTEROP is set."""
    # nginx lives in /usr/sbin, which is not on every user's PATH
    path = shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )
    if path is None:
        if interop_required():
            pytest.fail(
                f"{name}{NOT_INSTALLED} and {REQUIRE_ENV} is set (`make interop-deps`)",
                pytrace=False,
            )
        pytest.skip(f"{name}{NOT_INSTALLED} (`make interop-deps` installs it)")
    return path


def program_version(argv: Sequence[str], pattern: str = r"(\d+(?:\.\d+)+)") -> str:
    """The first version number a program prints (stdout or stderr) for ``argv``."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: be killed when the test process dies.

    A pytest killed by a timeout or a signal runs no ``finally``; without this its servers
    would live on, orphaned. Forked workers are not covered: gunicorn's notice that their
    master is gone and exit, nginx's would not, so nginx runs without a master process.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """One running third-party server. Use ``start_server``; always ``stop()`` it."""

    def __init__(self, name: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.port = port
        self.process = process
        self.log = log
        self.version = ""

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the server and everything it forked, and reap it. Safe to call twice."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)


def start_server(
    name: str,
    argv_for_port: Callable[[int], Sequence[str]],
    *,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    attempts: int = 3,
) -> ServerProcess:
    """Start ``argv_for_port(port)`` on a free port and wait until it accepts connections.

    A free port can be taken by someone else between our probe and the server's bind, so a
    server that exits during start-up is tried again on another port.
    """
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"interop-{name}-"))
    failures: list[str] = []
    for attempt in range(attempts):
        port = free_port()
        log = log_dir / f"{name}-{attempt}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                list(argv_for_port(port)),
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        server = ServerProcess(name, port, process, log)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                if accepts(port):
                    return server
                time.sleep(0.05)
        except BaseException:
            server.stop()
            raise
        server.stop()
        failures.append(f"attempt {attempt + 1} on port {port}:\n{server.output()[-3000:]}")
    raise RuntimeError(f"{name} did not start accepting connections:\n" + "\n".join(failures))


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
