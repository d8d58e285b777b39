"""What Python hooks cost per request: a route without hooks, and with trivial ones.

    .venv/bin/python bench/hooks_overhead.py [--rounds 6] [--seconds 5]
    .venv/bin/python bench/hooks_overhead.py --baseline /path/to/other/tree

The upstream is nginx (``GET /`` answered with 100 bytes, as in bench/vs_nginx.py); each
variant is a ``pooled-proxy run`` of its own, pinned to CPU 0, loaded by ``wrk -t1 -c64``
on CPU 1, and measured as the proxy's CPU time per request (``/proc/PID/schedstat``). The
variants run in turn, in alternating order, round after round, and the medians are printed:

- ``no hooks``: the route has none (what every route without hooks pays);
- ``no hooks, baseline``: the same config served from ``--baseline``, another checkout (a
  tree without hooks, say): its ``python -m pooled_proxy`` runs with that tree as its
  working directory, which Python puts first on the module path;
- one hook that returns None, as a plain ``def`` and as an ``async def`` (which runs under
  ``hook_timeout``: a cancel scope); a ``def`` that sets a header; a ``def`` that registers a
  response callback adding a header.

``--no-hooks-only`` runs the first two alone (for the A/B of a route without hooks).

``--loop`` measures the hooks' own work instead, in this process, without sockets: what a
request of a hooked route adds (the request's view, its ID, the hooks, the response
callbacks run on the response head), the minimum of alternating rounds; steadier than the
end-to-end figures on a shared machine, where a run's noise is larger than a hook.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_nginx

HOOKS = """
def noop(request):
    return None


async def noop_async(request):
    return None


def set_header(request):
    request.headers.set("x-tenant", "acme")


def _stamp(response):
    response.headers.add("x-served-by", "pooled-proxy")


def response_callback(request):
    request.on_response(_stamp)
"""


@dataclass(frozen=True)
class Variant:
    label: str
    tree: Path
    hook: str | None  # a function of HOOKS, or None for a route without hooks


def config(port: int, upstream_port: int, hook: str | None) -> str:
    hooks = f'hooks = ["bench_hooks:{hook}"]\n' if hook else ""
    return f"""[server]
listen = ["{vs_nginx.HOST}:{port}"]

[log]
access = "off"
level = "warning"

[upstreams.fast]
servers = ["{vs_nginx.HOST}:{upstream_port}"]
max_idle = 64

[[routes]]
upstream = "fast"
{hooks}"""


@contextmanager
def upstream(workdir: Path) -> Iterator[int]:
    setup = vs_nginx.Setup(workdir, upstream_port=vs_nginx.free_port())
    setup.upstream_h2_port = vs_nginx.free_port()
    big = workdir / "big.bin"
    big.touch()
    (workdir / "upstream.conf").write_text(vs_nginx.upstream_nginx_conf(setup, big))
    log = workdir / "upstream.log"
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            vs_nginx.pinned(
                vs_nginx.LOAD_CPU,
                ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")],
            ),
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        vs_nginx.wait_for_port(setup.upstream_port, process, "upstream nginx", log)
        yield setup.upstream_port
    finally:
        vs_nginx.stop(process)


def measure(variant: Variant, workdir: Path, upstream_port: int, seconds: float) -> float:
    """CPU µs per request of one run of ``variant``."""
    port = vs_nginx.free_port()
    path = workdir / f"{variant.label.replace(' ', '_').replace(',', '')}.toml"
    path.write_text(config(port, upstream_port, variant.hook))
    log = workdir / "proxy.log"
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            vs_nginx.pinned(
                vs_nginx.PROXY_CPU, [sys.executable, "-m", "pooled_proxy", "run", "-c", str(path)]
            ),
            cwd=variant.tree,  # python -m puts the working directory first on the path
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        vs_nginx.wait_for_port(port, process, variant.label, log)
        time.sleep(0.3)
        vs_nginx.run_wrk(port, 1, vs_nginx.LOAD_CPU)  # warm up: connections, pools, caches
        return vs_nginx.run_wrk(port, seconds, vs_nginx.LOAD_CPU, process.pid)["cpu_us"]
    finally:
        vs_nginx.stop(process)


class _NullSink:
    head_sent = False

    async def send_head(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        body: bytes = b"",
        end: bool = False,
    ) -> None:
        pass


def loop(rounds: int, count: int = 5000) -> int:
    """The hooks' work per request in a loop: µs, minimum of ``rounds`` alternating rounds."""
    import trio

    from pooled_proxy.exchange import Exchange, ExchangeRecord, RequestHead
    from pooled_proxy.route_hooks import HookChain, LoadedHook, run_hooks

    namespace: dict[str, object] = {}
    exec(HOOKS, namespace)  # noqa: S102 (the hooks above, as a module would define them)
    head = RequestHead(
        method=b"GET", target=b"/", authority=b"127.0.0.1:8080", scheme=b"http",
        headers=[(b"user-agent", b"wrk"), (b"accept", b"*/*")], http_version=b"1.1",
        client_ip=b"127.0.0.1", has_body=False, checked=True,
    )  # fmt: skip
    response = [(b"content-type", b"text/plain"), (b"content-length", b"100")]
    labels = {"": "(no hook: the loop's own work, subtracted below)", "noop": "def, returns None", "noop_async": "async def, returns None",
              "set_header": "def, sets a header",
              "response_callback": "def, a response callback adds a header"}  # fmt: skip
    best = {name: float("inf") for name in labels}

    async def one_round(name: str) -> float:
        waits = name == "noop_async"
        function = namespace.get(name)
        chain = HookChain((LoadedHook(name, function, waits),), 1.0, waits)  # type: ignore[arg-type]
        sink = _NullSink()
        started = time.perf_counter()
        for _ in range(count):
            record = ExchangeRecord(start=0.0, wall_start=0.0)
            exchange = Exchange(head=head, body=None, sink=sink, record=record)  # type: ignore[arg-type]
            if function is None:
                await exchange.sink.send_head(200, list(response))
                continue
            hooked = await run_hooks(chain, exchange, "fast", ("fast",), b"x-request-id")
            assert hooked is not None
            await hooked[2].send_head(200, list(response))
        return (time.perf_counter() - started) / count * 1e6

    async def all_rounds() -> None:
        for number in range(rounds):
            for name in labels if number % 2 == 0 else list(labels)[::-1]:
                best[name] = min(best[name], await one_round(name))

    trio.run(all_rounds)
    print(f"the hooks' work per request, in a loop: minimum of {rounds} rounds of {count}")
    print("| one hook | µs per request |\n|---|---:|")
    for name, label in labels.items():
        figure = best[name] - best[""] if name else best[name]
        print(f"| {label} | {figure:.1f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--no-hooks-only", action="store_true", help="no variant with hooks")
    parser.add_argument("--loop", action="store_true", help="in-process loop, no sockets")
    args = parser.parse_args()
    if args.loop:
        return loop(args.rounds)
    vs_nginx.ensure_tools()
    os.sched_setaffinity(0, {vs_nginx.LOAD_CPU})
    here = vs_nginx.REPO
    variants = [Variant("no hooks", here, None)]
    if args.baseline is not None:
        variants.append(Variant("no hooks, baseline", args.baseline.resolve(), None))
    if not args.no_hooks_only:
        variants += [
            Variant("one def hook, returns None", here, "noop"),
            Variant("one async def hook, returns None", here, "noop_async"),
            Variant("one def hook, sets a header", here, "set_header"),
            Variant("one def hook, a response callback adds a header", here, "response_callback"),
        ]
    results: dict[str, list[float]] = {variant.label: [] for variant in variants}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-hooks-")))
        os.chmod(workdir, 0o755)
        (workdir / "bench_hooks.py").write_text(HOOKS)
        upstream_port = stack.enter_context(upstream(workdir))
        for number in range(args.rounds):
            order = variants if number % 2 == 0 else variants[::-1]
            for variant in order:
                cpu = measure(variant, workdir, upstream_port, args.seconds)
                results[variant.label].append(cpu)
                print(f"round {number + 1}: {variant.label}: {cpu:.1f} µs", flush=True)
    base = statistics.median(results["no hooks"])
    print(f"\n{args.rounds} rounds x {args.seconds:g} s, wrk -t1 -c64, medians")
    print("| variant | proxy CPU µs per request | vs no hooks |\n|---|---:|---:|")
    for label, values in results.items():
        median = statistics.median(values)
        print(f"| {label} | {median:.1f} | {median - base:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
