"""Profile pooled-proxy's HTTP/1.1 hot path with py-spy while wrk loads it.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile_h1.py [--seconds 10] [--h2] [--out profile.txt]

Starts the same upstream and pooled-proxy as bench/vs_nginx.py (proxy pinned to CPU 0,
upstream and wrk on CPU 1), runs ``wrk -t1 -c64`` (or ``h2load -c16 -m10`` with ``--h2``)
for ``--seconds`` while ``py-spy record --format raw`` samples the proxy, and prints the
functions with the most samples: self time (the frame on top) and total time (anywhere on
the stack). The collapsed stacks are kept in ``--out`` for a flame graph
(``flamegraph.pl`` or https://www.speedscope.app).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
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


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--h2", action="store_true", help="h2load over h2c instead of wrk")
    parser.add_argument("--out", type=Path, default=Path("profile.txt"), help="collapsed stacks")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    setup_args = argparse.Namespace(no_pin=False, workers=1, idle_connections=1000)
    vs_nginx.ensure_tools()
    os.sched_setaffinity(0, {vs_nginx.LOAD_CPU})
    with vs_nginx.running_setup(setup_args) as setup:
        load = threading.Thread(
            target=(vs_nginx.run_h2load if args.h2 else vs_nginx.run_wrk),
            args=(setup.proxy_port, args.seconds + 2, vs_nginx.LOAD_CPU),
        )
        load.start()
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
        load.join()
    print(summarize(args.out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
