"""Running third-party clients (curl, h2load, nghttp) against the proxy from a trio test.

They run with ``trio.run_process`` so the proxy, in the same trio loop, keeps serving.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .servers import require_program


async def run(argv: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )


async def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
    done = await run([require_program("curl"), "--silent", "--show-error", *args], timeout=timeout)
    assert done.returncode == 0, (args, done.returncode, done.stderr.decode(errors="replace"))
    return done


@dataclass(frozen=True)
class H2loadResult:
    total: int
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    protocol: str
    output: str


async def h2load(*args: str, timeout: float = 60.0) -> H2loadResult:
    done = await run([require_program("h2load"), *args], timeout=timeout)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, (args, out, done.stderr.decode(errors="replace"))
    requests = re.search(
        r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored",
        out,
    )
    status = re.search(r"status codes: (\d+) 2xx", out)
    protocol = re.search(r"Application protocol: (\S+)", out)
    assert requests and status, out
    return H2loadResult(
        total=int(requests.group(1)),
        succeeded=int(requests.group(2)),
        failed=int(requests.group(3)),
        errored=int(requests.group(4)),
        status_2xx=int(status.group(1)),
        protocol=protocol.group(1) if protocol else "?",
        output=out,
    )


async def stream_lines(argv: Sequence[str], *, timeout: float = 30.0) -> list[tuple[bytes, float]]:
    """Run a client that prints a stream; return each output line with when it arrived."""
    lines: list[tuple[bytes, float]] = []
    with trio.fail_after(timeout):
        process = await trio.lowlevel.open_process(list(argv), stdout=subprocess.PIPE)
        try:
            assert process.stdout is not None
            pending = b""
            async with process.stdout:
                while True:
                    data = await process.stdout.receive_some(65536)
                    if not data:
                        break
                    now = time.time()
                    pending += data
                    *complete, pending = pending.split(b"\n")
                    lines.extend((line, now) for line in complete)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    return lines
