"""Profile pooled-proxy's HTTP/1.1 hot path with py-spy while wrk loads it.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_h1.py [--seconds 10] [--h2 | --queued | --unqueued]
        [--out profile.txt]

Starts the same upstream and pooled-proxy as bench/vs_nginx.py (proxy pinned to CPU 0,
upstream and wrk on CPU 1), runs ``wrk -t1 -c64`` (or ``h2load -c16 -m10`` with ``--h2``;
``wrk -t1 -c256`` on the routes of ``make bench``'s queued and unqueued rows with
``--queued`` and ``--unqueued``) for ``--seconds`` while ``py-spy record --format raw``
samples the proxy, and prints the functions with the most samples: self time (the frame on
top) and total time (anywhere on the stack), then the samples grouped by owner (the library
or part of the proxy whose code was running; a standard-library frame counts for whoever
called it) beside the proxy's user and kernel CPU time over the same seconds. The collapsed
stacks are kept in ``--out`` for a flame graph (``flamegraph.pl`` or
https://www.speedscope.app).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_nginx


def summarize(collapsed: Path, top: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            total[frame] += count
    lines = [f"{samples} samples", "", "self %   function"]
    lines += [f"{100 * n / samples:6.1f}   {name}" for name, n in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:6.1f}   {name}" for name, n in total.most_common(top)]
    return "\n".join(lines)


# Owners by where a frame's file lies (py-spy names a file by its path below site-packages
# or the working directory); the first match wins. Frames of none of them (the standard
# library, builtins) are charged to the nearest caller that has one.
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("h2, hpack, hyperframe", ("h2/", "hpack/", "hyperframe/")),
    ("h11", ("h11/",)),
    ("trio: scheduler and I/O", ("trio/", "outcome/", "sniffio/")),
    (
        "front end: server/http2.py, protocol/h2_server.py",
        ("pooled_proxy/server/http2.py", "pooled_proxy/protocol/h2_server.py"),
    ),
    ("front end: HTTP/1.1", ("pooled_proxy/server/http1", "pooled_proxy/server/client_watch.py")),
    # Its send and recv calls, and so most of the kernel's time, for both sides.
    ("socket calls: fastio.py", ("pooled_proxy/fastio.py",)),
    (
        "upstream: pools, connections, HTTP/1.1 codec",
        ("pooled_proxy/upstream/", "pooled_proxy/protocol/http1/"),
    ),
    (
        "request checks and header conversion",
        (
            "pooled_proxy/protocol/request_checks.py",
            "pooled_proxy/protocol/abnf.py",
            "pooled_proxy/headers.py",
        ),
    ),
    ("forward, proxy, metrics, request IDs, exchange, routing", ("pooled_proxy/",)),
)


def owner(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = frame.partition(" (")[2]
        for name, marks in OWNERS:
            if path.startswith(marks):
                return name
    return "other (no owner on the stack)"


def by_owner(collapsed: Path, user_kernel: tuple[float, float] | None, cpu_us: float | None) -> str:
    counts: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack:
            counts[owner(stack.split(";"))] += int(count_text)
            samples += int(count_text)
    lines = ["", "self %   us/req  owner"]
    per_request = cpu_us if cpu_us is not None else math.nan
    lines += [
        f"{100 * n / samples:6.1f}   {per_request * n / samples:6.1f}  {name}"
        for name, n in counts.most_common()
    ]
    lines.append(f"100.0   {per_request:6.1f}  proxy CPU per request (schedstat)")
    if user_kernel is not None:
        user, kernel = user_kernel
        lines.append(
            f"\nproxy CPU over the samples: user {user:.2f} s, kernel {kernel:.2f} s "
            f"({100 * kernel / ((user + kernel) or 1):.0f}% kernel)"
        )
    return "\n".join(lines)


def user_kernel_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a process and its children so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--h2", action="store_true", help="h2load over h2c instead of wrk")
    parser.add_argument(
        "--queued", action="store_true", help="wrk -c256 with every request queued instead"
    )
    parser.add_argument(
        "--unqueued", action="store_true", help="wrk -c256 with connections for every client"
    )
    parser.add_argument("--out", type=Path, default=Path("profile.txt"), help="collapsed stacks")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    setup_args = argparse.Namespace(no_pin=False, workers=1, idle_connections=1000, scaling=False)
    vs_nginx.ensure_tools()
    os.sched_setaffinity(0, {vs_nginx.LOAD_CPU})
    with vs_nginx.running_setup(setup_args) as setup:
        measured: dict[str, float] = {}

        def run_load() -> None:
            if args.h2:
                run = vs_nginx.run_h2load
            elif args.queued or args.unqueued:
                path = vs_nginx.QUEUE_PATH if args.queued else vs_nginx.UNQUEUED_PATH
                run = partial(vs_nginx.run_wrk, connections=vs_nginx.QUEUE_CLIENTS, path=path)
            else:
                run = vs_nginx.run_wrk
            measured.update(
                run(setup.proxy_port, args.seconds + 2, vs_nginx.LOAD_CPU, setup.proxy_pid)
            )

        load = threading.Thread(target=run_load)
        load.start()
        before = user_kernel_seconds(setup.proxy_pid)
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(setup.proxy_pid),
                "--duration",
                str(args.seconds),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(args.out),
                "--nonblocking",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        after = user_kernel_seconds(setup.proxy_pid)
        load.join()
    print(summarize(args.out, args.top))
    user_kernel = (after[0] - before[0], after[1] - before[1])
    print(by_owner(args.out, user_kernel, measured.get("cpu_us")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
