"""A/B of two (or more) source trees of pooled-proxy: proxy CPU per HTTP/1.1 request.

    .venv/bin/python bench/ab_http1.py A_TREE B_TREE [--runs 5] [--seconds 5]
    .venv/bin/python bench/ab_http1.py ../base ../step1 . --runs 8 --rows get,queued
    .venv/bin/python bench/ab_http1.py ../base . --together

On a machine others use, req/s and even CPU per request drift by tens of percent over
minutes; a change is judged by runs of each tree taken in the same minutes, each tree going
first in turn. With ``--together`` the trees' runs of a round go at the same time (a wrk per
tree): the proxies share CPU 0 and whatever else the machine runs in those seconds, which
cancels more of the noise. Each tree's proxy runs as ``make bench`` runs it
(``vs_nginx.py``: one worker pinned to CPU 0, the access log off, the nginx upstream and wrk
on CPU 1), started with the tree as its working directory so that ``python -m pooled_proxy``
imports that tree's package (the working directory comes first on ``sys.path``).

Rows (``--rows``, default get,post): ``get`` (wrk -c64 GET), ``post`` (wrk -c64, 100-byte
POST), ``queued`` (wrk -c256 against an upstream of max_connections 100: requests wait in
the pool's queue), ``unqueued`` (wrk -c256 with connections enough for every client).
``--workers N`` runs each proxy as a group of N workers on every CPU; the group's CPU is not
measured then, and the rounds' differences are of the p99.

It prints every run, then per row the medians of the proxy's CPU time per request and of
req/s for each tree, the median of each round's difference to the first tree (A), and in how
many rounds the tree was below A.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import vs_nginx as bench


def start_proxy(
    stack: ExitStack, tree: Path, setup: bench.Setup, name: str, workers: int
) -> subprocess.Popen[bytes]:
    config = setup.workdir / f"{name}.toml"
    config.write_text(
        bench.pooled_proxy_toml(
            setup,
            workers=workers,
            connections=1024,
            port=setup.proxy_port,
            admin_port=setup.admin_port,
        )
    )
    log = setup.workdir / f"{name}.log"
    process = subprocess.Popen(
        bench.pinned(
            bench.PROXY_CPU if workers == 1 else bench.ALL_CPUS_LIST,
            [sys.executable, "-m", "pooled_proxy", "run", "-c", str(config)],
        ),
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=stack.enter_context(log.open("wb")),
        stdin=subprocess.DEVNULL,
    )
    stack.callback(bench.stop, process)
    bench.wait_for_port(setup.proxy_port, process, f"pooled-proxy from {tree}", log)
    return process


def measure(row: str, port: int, seconds: float, pid: int | None, post: Path) -> dict[str, float]:
    if row == "get":
        return bench.run_wrk(port, seconds, bench.LOAD_CPU, pid)
    if row == "post":
        return bench.run_wrk(port, seconds, bench.LOAD_CPU, pid, post)
    return bench.run_wrk(
        port,
        seconds,
        bench.LOAD_CPU,
        pid,
        connections=bench.QUEUE_CLIENTS,
        path=bench.QUEUE_PATH if row == "queued" else bench.UNQUEUED_PATH,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("base", type=Path, help="tree A, the baseline")
    parser.add_argument("trees", type=Path, nargs="+", help="the trees compared with it: B, ...")
    parser.add_argument("--runs", type=int, default=5, help="rounds, one run of each tree (5)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    parser.add_argument("--rows", default="get,post", help="get, post, queued, unqueued (get,post)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of each proxy (1); with more, on every CPU and no CPU figure",
    )
    parser.add_argument(
        "--together", action="store_true", help="run the trees of a round at the same time"
    )
    args = parser.parse_args(argv)
    rows = args.rows.split(",")
    if unknown := set(rows) - {"get", "post", "queued", "unqueued"}:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    paths = [args.base, *args.trees]
    trees = {chr(ord("A") + index): path.resolve() for index, path in enumerate(paths)}
    for tree in trees.values():
        if not (tree / "pooled_proxy" / "__init__.py").exists():
            parser.error(f"{tree} has no pooled_proxy package")
    bench.ensure_tools()
    os.sched_setaffinity(0, {bench.LOAD_CPU})
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-ab-")))
        os.chmod(workdir, 0o755)
        upstream = bench.Setup(workdir, upstream_port=bench.free_port())
        upstream.upstream_h2_port = bench.free_port()
        (workdir / "upstream.conf").write_text(
            bench.upstream_nginx_conf(upstream, workdir / "none")
        )
        log = workdir / "upstream.log"
        nginx = subprocess.Popen(
            bench.pinned(
                bench.LOAD_CPU, ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")]
            ),
            stdout=subprocess.DEVNULL,
            stderr=stack.enter_context(log.open("wb")),
        )
        stack.callback(bench.stop, nginx)
        bench.wait_for_port(upstream.upstream_port, nginx, "upstream nginx", log)
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, tree in trees.items():
            setup = bench.Setup(
                workdir,
                upstream_port=upstream.upstream_port,
                sse_port=bench.free_port(),  # nothing listens: no row uses it
                proxy_port=bench.free_port(),
                admin_port=bench.free_port(),
            )
            pid = start_proxy(stack, tree, setup, name, args.workers).pid
            if args.workers == 1:  # a group's CPU is its workers', not the supervisor's
                pids[name] = pid
            ports[name] = setup.proxy_port
        post = workdir / "post.lua"
        post.write_text(bench.POST_LUA)
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        names = list(trees)
        for number in range(args.runs):
            # Each tree goes first in turn.
            order = names[number % len(names) :] + names[: number % len(names)]
            for row in rows:
                runs: dict[str, dict[str, float]] = {}

                def measured(
                    name: str, row: str = row, runs: dict[str, dict[str, float]] = runs
                ) -> None:
                    measure(row, ports[name], args.warmup, None, post)
                    runs[name] = measure(row, ports[name], args.seconds, pids.get(name), post)

                bench.run_each(order, measured, together=args.together)
                for name in order:
                    run = runs[name]
                    results.setdefault((row, name), []).append(run)
                    print(
                        f"round {number + 1} {row:8} {name}: {run['cpu_us']:6.1f} us/request "
                        f"{run['rps']:8,.0f} req/s  p99 {run['p99_ms']:.1f} ms",
                        flush=True,
                    )
    print()
    for name, tree in trees.items():
        print(f"{name} = {tree}")
    # A group's CPU is not measured: the differences are then of the p99.
    compared = "cpu_us" if args.workers == 1 else "p99_ms"
    print(
        f"{args.runs} rounds x {args.seconds:g} s, medians; CPU us per request (req/s, p99 ms);"
        f" differences of {compared}"
    )
    others = names[1:]
    print(
        "| row | A | "
        + " | ".join(f"{name} | {name} - A (median of rounds)" for name in others)
        + " |"
    )
    print("|---|---:|" + "---:|---:|" * len(others))
    for row in rows:
        base = results[(row, "A")]

        def cell(runs: list[dict[str, float]]) -> str:
            cpu = statistics.median(run["cpu_us"] for run in runs)
            rps = statistics.median(run["rps"] for run in runs)
            p99 = statistics.median(run["p99_ms"] for run in runs)
            return f"{cpu:.1f} ({rps:,.0f}, {p99:.0f})"

        cells = [cell(base)]
        for name in others:
            runs = results[(row, name)]
            diffs = [y[compared] - x[compared] for x, y in zip(base, runs)]
            lower = sum(diff < 0 for diff in diffs)
            cells += [cell(runs), f"{statistics.median(diffs):+.1f} ({lower}/{len(diffs)} lower)"]
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
