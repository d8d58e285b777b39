"""A/B: the proxy's CPU time per h2c request, two source trees taking turns.

    git worktree add --detach /tmp/base main         # the tree to compare against
    .venv/bin/python bench/ab_h2.py --a /tmp/base --b . [--pairs 7] [--duration 5]
    .venv/bin/python bench/ab_h2.py --a . --b . --together  # a noise check: A = B

One upstream nginx (as bench/vs_nginx.py sets it up) and one pooled-proxy per tree, both
pinned to CPU 0 and started from inside their tree (``python -m`` puts the working directory
first on ``sys.path``, so each imports its own ``pooled_proxy``); h2load and nginx run on
CPU 1. Each pair runs ``h2load -c16 -m10`` against A and B, in alternating order, and reads the
proxy's CPU time from ``/proc/PID/schedstat``: on a shared machine the load of others moves the
absolute figures by tens of percent within minutes, so only runs taken side by side are
compared. With ``--together`` each pair loads A and B at the same time: both proxies share CPU
0 and whatever else the machine runs there during those seconds, which cancels more of the
noise. It prints every pair, then the medians and the median of the pairwise differences.
(bench/ab_http1.py does the same for HTTP/1.1 GETs and POSTs under wrk.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_nginx


def start_proxy(
    stack: ExitStack,
    tree: Path,
    workdir: Path,
    name: str,
    setup: vs_nginx.Setup,
    env: dict[str, str] | None = None,
) -> tuple[int, int]:
    setup.proxy_port, setup.admin_port = vs_nginx.free_port(), vs_nginx.free_port()
    config = workdir / f"{name}.toml"
    config.write_text(
        vs_nginx.pooled_proxy_toml(
            setup, workers=1, connections=1000, port=setup.proxy_port, admin_port=setup.admin_port
        )
    )
    log = workdir / f"{name}.log"
    process = subprocess.Popen(
        vs_nginx.pinned(
            vs_nginx.PROXY_CPU, [sys.executable, "-m", "pooled_proxy", "run", "-c", str(config)]
        ),
        cwd=tree,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=stack.enter_context(open(log, "wb")),  # noqa: SIM115 (the stack closes it)
        stdin=subprocess.DEVNULL,
    )
    stack.callback(vs_nginx.stop, process)
    vs_nginx.wait_for_port(setup.proxy_port, process, f"pooled-proxy {name}", log)
    vs_nginx.wait_for_port(setup.admin_port, process, f"pooled-proxy {name} admin", log)
    return setup.proxy_port, process.pid  # taskset execs: the proxy's own pid (or its tree's)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline tree")
    parser.add_argument("--b", type=Path, required=True, help="the tree with the change")
    parser.add_argument(
        "--b-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in B's environment (e.g. POOLED_PROXY_H11=h11 with --a and --b the same tree)",
    )
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--together",
        action="store_true",
        help="load A and B at the same time (they share CPU 0, and whatever else runs there)",
    )
    args = parser.parse_args()
    load = vs_nginx.run_h2load
    vs_nginx.ensure_tools()
    os.sched_setaffinity(0, {vs_nginx.LOAD_CPU})
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-ab-")))
        os.chmod(workdir, 0o755)
        setup = vs_nginx.Setup(workdir)
        setup.upstream_port = vs_nginx.free_port()
        setup.upstream_h2_port = vs_nginx.free_port()
        setup.sse_port = vs_nginx.free_port()  # routed to, never started: not measured here
        (workdir / "upstream.conf").write_text(
            vs_nginx.upstream_nginx_conf(setup, workdir / "absent")
        )
        upstream_log = workdir / "upstream.log"
        nginx = subprocess.Popen(
            vs_nginx.pinned(
                vs_nginx.LOAD_CPU,
                ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")],
            ),
            stdout=subprocess.DEVNULL,
            stderr=stack.enter_context(open(upstream_log, "wb")),
            stdin=subprocess.DEVNULL,
        )
        stack.callback(vs_nginx.stop, nginx)
        vs_nginx.wait_for_port(setup.upstream_port, nginx, "upstream nginx", upstream_log)
        trees = {"A": args.a.resolve(), "B": args.b.resolve()}
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, tree in trees.items():
            env = dict(item.split("=", 1) for item in args.b_env) if name == "B" else None
            ports[name], pids[name] = start_proxy(stack, tree, workdir, name, setup, env)
        time.sleep(0.5)
        for name in trees:
            load(ports[name], args.warmup, vs_nginx.LOAD_CPU)
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        rps: dict[str, list[float]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            order = ("A", "B") if pair % 2 == 0 else ("B", "A")
            results: dict[str, dict[str, float]] = {}

            def run(name: str, results: dict[str, dict[str, float]] = results) -> None:
                results[name] = load(ports[name], args.duration, vs_nginx.LOAD_CPU, pids[name])

            vs_nginx.run_each(order, run, together=args.together)
            for name in order:
                cpu[name].append(results[name]["cpu_us"])
                rps[name].append(results[name]["rps"])
            print(
                f"pair {pair + 1}: A {cpu['A'][-1]:6.1f} us ({rps['A'][-1]:7.0f} req/s)   "
                f"B {cpu['B'][-1]:6.1f} us ({rps['B'][-1]:7.0f} req/s)   "
                f"B-A {cpu['B'][-1] - cpu['A'][-1]:+6.1f}",
                flush=True,
            )
    differences = [b - a for a, b in zip(cpu["A"], cpu["B"], strict=True)]
    print(
        f"medians: A {statistics.median(cpu['A']):.1f} us ({statistics.median(rps['A']):.0f} "
        f"req/s), B {statistics.median(cpu['B']):.1f} us ({statistics.median(rps['B']):.0f} "
        f"req/s); B-A median {statistics.median(differences):+.1f} us, "
        f"{sum(d < 0 for d in differences)}/{len(differences)} pairs lower"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
