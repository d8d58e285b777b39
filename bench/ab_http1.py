"""A/B of two source trees of pooled-proxy: proxy CPU per HTTP/1.1 request, GET and POST.

    .venv/bin/python bench/ab_http1.py A_TREE B_TREE [--runs 5] [--seconds 5]

Starts one upstream nginx (as bench/vs_nginx.py does) and one pooled-proxy per tree, each
run as ``python -m pooled_proxy`` from inside its tree (so the tree's own package is the one
imported, whatever is installed), pinned to the same CPU. Then ``wrk -t1 -c64`` loads them
in turn, A B A B ..., a GET run and a 100-byte POST run each time, and the proxy's CPU time
per request is read from ``/proc/PID/schedstat``. Alternating runs share the machine's
drift between A and B; the medians and the B/A ratio are printed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_nginx
from vs_nginx import HOST, LOAD_CPU, POST_LUA, PROXY_CPU, Setup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="tree A (the baseline)")
    parser.add_argument("b", type=Path, help="tree B")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    vs_nginx.ensure_tools()
    figures: dict[tuple[str, str], list[float]] = {}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-ab-")))
        setup = Setup(workdir, upstream_port=vs_nginx.free_port())
        setup.upstream_h2_port = vs_nginx.free_port()
        big = workdir / "big.bin"
        big.touch()
        (workdir / "upstream.conf").write_text(vs_nginx.upstream_nginx_conf(setup, big))
        post = workdir / "post.lua"
        post.write_text(POST_LUA)

        def start(argv: list[str], name: str, port: int, cwd: Path | None = None) -> int:
            log = workdir / f"{name}.log"
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(open(log, "wb")),
                stdin=subprocess.DEVNULL,
            )
            stack.callback(vs_nginx.stop, process)
            vs_nginx.wait_for_port(port, process, name, log)
            return process.pid

        start(
            vs_nginx.pinned(
                LOAD_CPU, ["nginx", "-p", str(workdir), "-c", f"{workdir}/upstream.conf"]
            ),
            "upstream",
            setup.upstream_port,
        )
        proxies: dict[str, tuple[int, int]] = {}
        for name, tree in (("A", args.a), ("B", args.b)):
            port = vs_nginx.free_port()
            config = workdir / f"{name}.toml"
            config.write_text(
                f'[server]\nlisten = ["{HOST}:{port}"]\n[log]\naccess = "off"\n'
                f'level = "warning"\n[upstreams.fast]\nservers = ["{HOST}:{setup.upstream_port}"]\n'
                'max_idle = 64\n[[routes]]\nupstream = "fast"\n'
            )
            argv = [sys.executable, "-m", "pooled_proxy", "run", "-c", str(config)]
            pid = start(vs_nginx.pinned(PROXY_CPU, argv), f"proxy-{name}", port, cwd=tree.resolve())
            proxies[name] = (port, pid)
        for run in range(args.runs):
            for name, (port, pid) in proxies.items():
                for kind, script in (("GET", None), ("POST", post)):
                    result = vs_nginx.run_wrk(port, args.seconds, LOAD_CPU, pid, script)
                    figures.setdefault((name, kind), []).append(result["cpu_us"])
                    print(
                        f"run {run + 1} {name} {kind}: {result['cpu_us']:.1f} µs, "
                        f"{result['rps']:.0f} req/s",
                        flush=True,
                    )
    for kind in ("GET", "POST"):
        a = statistics.median(figures[("A", kind)])
        b = statistics.median(figures[("B", kind)])
        print(
            f"{kind}: A {a:.1f} µs, B {b:.1f} µs per request (medians of {args.runs}); "
            f"B/A {b / a:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
