"""Count trio's scheduler steps and tasks per h2c (or HTTP/1.1) request through the proxy.

    .venv/bin/python bench/h2_steps.py [--seconds 5] [--h1 [--post] [--connections N]]
        [--queued | --unqueued] [--events] [--where]

The same upstream and proxy config as bench/ab_h2.py, but the proxy runs in this process,
pinned to CPU 0, under a ``trio.abc.Instrument`` that counts task steps (by the task's
function name), tasks spawned, cancel scopes entered and I/O waits (``before_io_wait``
calls, i.e. trips to epoll) while ``h2load -c16 -m10`` runs from a thread on CPU 1 (with
``--h1``, ``wrk -c64`` GETs, or POSTs of 100 bytes with ``--post``; with ``--queued`` and
``--unqueued``, ``wrk -c256`` on the routes of ``make bench``'s queued and unqueued rows);
with ``--where``, also the function (and line) each step ended waiting in; with
``--events``, the ``trio.Event`` objects made. It prints them per request: a
scheduler step costs a few microseconds here, so fewer per exchange is one of the ways to
a cheaper request.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_nginx

from pooled_proxy.config import load_config
from pooled_proxy.daemon.serve import run_with_operations


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.counting = False
        self.where = False
        self.suspended: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()
        self.spawned = 0
        self.io_waits = 0
        self.scopes = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counting:
            self.steps[task.name.rpartition(".")[2]] += 1

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if self.counting:
            self.spawned += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counting and self.where:
            self.suspended[_suspension_point(task)] += 1

    def before_io_wait(self, timeout: float) -> None:
        if self.counting:
            self.io_waits += 1


def count_cancel_scopes(counter: StepCounter) -> None:
    """Count the cancel scopes entered while the counter counts (trio has no instrument
    hook for them: ``CancelScope.__enter__`` is wrapped, in this process only)."""
    enter = trio.CancelScope.__enter__

    def counting_enter(scope: trio.CancelScope) -> trio.CancelScope:
        if counter.counting:
            counter.scopes += 1
        return enter(scope)

    trio.CancelScope.__enter__ = counting_enter  # type: ignore[method-assign]


def count_events(counter: StepCounter) -> Counter[str]:
    """Count the ``trio.Event`` objects made while the counter counts (``__init__`` wrapped,
    in this process only)."""
    made: Counter[str] = Counter()
    init = trio.Event.__init__

    def counting_init(event: trio.Event) -> None:
        if counter.counting:
            made["Event"] += 1
        init(event)

    trio.Event.__init__ = counting_init  # type: ignore[method-assign,assignment]
    return made


def _suspension_point(task: trio.lowlevel.Task) -> str:
    """The two innermost of the task's awaiting functions, with their lines."""
    frames: list[str] = []
    coro: Any = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return " < ".join(reversed(frames[-3:])) or "(ended)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--h1", action="store_true", help="wrk -c64 over HTTP/1.1 instead")
    parser.add_argument(
        "--post", action="store_true", help="with --h1: POSTs of 100 bytes (make bench's row)"
    )
    parser.add_argument(
        "--connections", type=int, default=0, help="with --h1: wrk's connections (64)"
    )
    parser.add_argument(
        "--queued", action="store_true", help="wrk -c256 with every request queued instead"
    )
    parser.add_argument(
        "--unqueued", action="store_true", help="wrk -c256 with connections for every client"
    )
    parser.add_argument("--events", action="store_true", help="also count the Events made")
    parser.add_argument(
        "--where", action="store_true", help="also count where the tasks wait after each step"
    )
    args = parser.parse_args()
    vs_nginx.ensure_tools()
    counter = StepCounter()
    counter.where = args.where
    count_cancel_scopes(counter)
    events = count_events(counter) if args.events else Counter[str]()
    results: dict[str, float] = {}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-steps-")))
        os.chmod(workdir, 0o755)
        setup = vs_nginx.Setup(workdir)
        for name in ("upstream_port", "upstream_h2_port", "sse_port", "proxy_port", "admin_port"):
            setattr(setup, name, vs_nginx.free_port())
        (workdir / "upstream.conf").write_text(
            vs_nginx.upstream_nginx_conf(setup, workdir / "absent")
        )
        log = workdir / "upstream.log"
        nginx = subprocess.Popen(
            vs_nginx.pinned(
                vs_nginx.LOAD_CPU,
                ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")],
            ),
            stdout=subprocess.DEVNULL,
            stderr=stack.enter_context(open(log, "wb")),
            stdin=subprocess.DEVNULL,
        )
        stack.callback(vs_nginx.stop, nginx)
        vs_nginx.wait_for_port(setup.upstream_port, nginx, "upstream nginx", log)
        config_file = workdir / "proxy.toml"
        config_file.write_text(
            vs_nginx.pooled_proxy_toml(
                setup,
                workers=1,
                connections=1000,
                port=setup.proxy_port,
                admin_port=setup.admin_port,
            )
        )
        config = load_config(str(config_file))
        load = vs_nginx.run_wrk if args.h1 else vs_nginx.run_h2load
        if args.post:
            if not args.h1:
                parser.error("--post goes with --h1")
            script = workdir / "post.lua"
            script.write_text(vs_nginx.POST_LUA)
            load = partial(vs_nginx.run_wrk, script=script)
        if args.h1 and args.connections:
            load = partial(load, connections=args.connections)
        if args.queued or args.unqueued:
            path = vs_nginx.QUEUE_PATH if args.queued else vs_nginx.UNQUEUED_PATH
            load = partial(vs_nginx.run_wrk, connections=vs_nginx.QUEUE_CLIENTS, path=path)

        def drive() -> None:
            time.sleep(1.0)  # the proxy is listening by then
            load(setup.proxy_port, 1, vs_nginx.LOAD_CPU)  # warm-up
            counter.counting = True
            started = time.monotonic()
            result = load(setup.proxy_port, args.seconds, vs_nginx.LOAD_CPU)
            counter.counting = False
            results["requests"] = result["rps"] * (time.monotonic() - started)
            results["rps"] = result["rps"]
            os.kill(os.getpid(), signal.SIGTERM)  # drain and stop

        os.sched_setaffinity(0, {vs_nginx.PROXY_CPU})
        threading.Thread(target=drive, daemon=True).start()
        trio.run(partial(run_with_operations, config), instruments=[counter])
    requests = results["requests"]
    print(f"{requests:.0f} requests ({results['rps']:.0f} req/s)")
    print(f"task steps per request: {sum(counter.steps.values()) / requests:.2f}")
    for name, count in counter.steps.most_common(12):
        print(f"  {count / requests:6.2f}  {name}")
    if args.where:
        print("where the steps end (innermost first):")
        for point, count in counter.suspended.most_common(15):
            print(f"  {count / requests:6.2f}  {point}")
    for name, count in events.items():
        print(f"{name}s made per request: {count / requests:.2f}")
    print(f"tasks spawned per request: {counter.spawned / requests:.2f}")
    print(f"cancel scopes entered per request: {counter.scopes / requests:.2f}")
    print(f"I/O waits (epoll) per request: {counter.io_waits / requests:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
