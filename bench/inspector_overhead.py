"""What the request inspector costs per request: pooled-proxy with ``[inspect]`` off (A) and on
(B), one after the other, on the same upstream, the same load and the same CPU.

    .venv/bin/python bench/inspector_overhead.py            # 5 rounds x 8 s of each
    .venv/bin/python bench/inspector_overhead.py --quick    # 1 round x 3 s

The upstream is nginx (one worker, ``GET /`` answered with 100 bytes; pinned to CPU 1 with
wrk); each proxy runs as ``pooled-proxy run`` (one worker, pinned to CPU 0, access log off,
metrics and the admin listener on, as in vs_nginx.py). B adds ``[inspect] enabled = true``
with the defaults (the last 200 exchanges, 64 KiB of each body). Rounds alternate A and B so
that a slower moment of a shared machine hits both. Each measures ``wrk -t1 -c64`` on GET and
on a 100-byte POST: the proxy's CPU time per request (``/proc/PID/schedstat``), and req/s.
It prints the medians and B's extra CPU per request over A.
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

import vs_nginx
from vs_nginx import HOST, LOAD_CPU, POST_LUA, PROXY_CPU, Setup

GOAL = 0.15  # B may use at most this much more CPU per request than A


def proxy_toml(proxy_port: int, admin_port: int, upstream_port: int, *, inspect: bool) -> str:
    inspector = "\n[inspect]\nenabled = true\n" if inspect else ""
    return f"""# written by bench/inspector_overhead.py
[server]
listen = ["{HOST}:{proxy_port}"]

[admin]
listen = "{HOST}:{admin_port}"

[log]
access = "off"
level = "warning"
{inspector}
[upstreams.fast]
servers = ["{HOST}:{upstream_port}"]
max_idle = 64
"""


def measure(
    workdir: Path, upstream_port: int, args: argparse.Namespace, *, inspect: bool
) -> dict[str, float]:
    """Start one proxy, load it on GET then POST, stop it."""
    proxy_port, admin_port = vs_nginx.free_port(), vs_nginx.free_port()
    name = "B" if inspect else "A"
    config = workdir / f"proxy-{name}.toml"
    config.write_text(proxy_toml(proxy_port, admin_port, upstream_port, inspect=inspect))
    log = workdir / f"proxy-{name}.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            vs_nginx.pinned(
                PROXY_CPU, [sys.executable, "-m", "pooled_proxy", "run", "-c", str(config)]
            ),
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            stdin=subprocess.DEVNULL,
        )
    try:
        vs_nginx.wait_for_port(proxy_port, process, f"pooled-proxy {name}", log)
        time.sleep(0.5)
        vs_nginx.run_wrk(proxy_port, 1, LOAD_CPU)  # warm up: pools, first GC
        get = vs_nginx.run_wrk(proxy_port, args.seconds, LOAD_CPU, process.pid)
        post = vs_nginx.run_wrk(
            proxy_port, args.seconds, LOAD_CPU, process.pid, workdir / "post.lua"
        )
    finally:
        vs_nginx.stop(process)
    return {
        "get_cpu_us": get["cpu_us"],
        "get_rps": get["rps"],
        "post_cpu_us": post["cpu_us"],
        "post_rps": post["rps"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="1 round x 3 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 3.0
    vs_nginx.ensure_tools()
    os.sched_setaffinity(0, {LOAD_CPU})
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-inspect-")))
        os.chmod(workdir, 0o755)
        (workdir / "post.lua").write_text(POST_LUA)
        setup = Setup(workdir, upstream_port=vs_nginx.free_port(),
                      upstream_h2_port=vs_nginx.free_port())  # fmt: skip
        big = workdir / "big.bin"
        big.touch()
        (workdir / "upstream.conf").write_text(vs_nginx.upstream_nginx_conf(setup, big))
        upstream_log = workdir / "upstream.log"
        upstream = subprocess.Popen(
            vs_nginx.pinned(
                LOAD_CPU, ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")]
            ),
            stdout=subprocess.DEVNULL,
            stderr=stack.enter_context(open(upstream_log, "wb")),
        )
        stack.callback(vs_nginx.stop, upstream)
        vs_nginx.wait_for_port(setup.upstream_port, upstream, "upstream nginx", upstream_log)
        for number in range(1, args.rounds + 1):
            for name in ("A", "B"):
                figures = measure(workdir, setup.upstream_port, args, inspect=name == "B")
                results[name].append(figures)
                print(
                    f"round {number} {name} (inspector {'on' if name == 'B' else 'off'}): "
                    f"GET {figures['get_cpu_us']:.1f} us/req {figures['get_rps']:.0f} req/s, "
                    f"POST {figures['post_cpu_us']:.1f} us/req {figures['post_rps']:.0f} req/s",
                    flush=True,
                )
    print()
    worst = 0.0
    print(f"{'medians':<10} {'inspector off':>16} {'inspector on':>16} {'extra CPU/req':>14}")
    for method in ("get", "post"):
        a = statistics.median(r[f"{method}_cpu_us"] for r in results["A"])
        b = statistics.median(r[f"{method}_cpu_us"] for r in results["B"])
        ra = statistics.median(r[f"{method}_rps"] for r in results["A"])
        rb = statistics.median(r[f"{method}_rps"] for r in results["B"])
        extra = b / a - 1
        worst = max(worst, extra)
        print(f"{method.upper() + ' CPU':<10} {a:>13.1f} us {b:>13.1f} us {extra:>+13.1%}")
        print(f"{method.upper() + ' req/s':<10} {ra:>16.0f} {rb:>16.0f}")
    verdict = "met" if worst <= GOAL else "MISSED"
    print(f"\ngoal: at most {GOAL:.0%} more CPU per request with the inspector on: {verdict}")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
