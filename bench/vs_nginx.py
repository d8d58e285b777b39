"""pooled-proxy against nginx as a reverse proxy, in one run, on this machine.

    .venv/bin/python bench/vs_nginx.py              # 3 runs x 10 s, medians (about 5 minutes)
    .venv/bin/python bench/vs_nginx.py --quick      # 1 run x 3 s, a smoke test of the numbers
    make bench                                      # the same as the first line

It installs what it needs when missing (nginx, haproxy, caddy, wrk, nghttp2-client from apt), then starts:

- the **upstream**: nginx, one worker, ``GET /`` answered ``return 200`` with a 100-byte body,
  ``/big`` a 1 GiB file; and the built-in demo upstream for ``/events`` (Server-Sent Events,
  one event every 100 ms, each stamped with the wall-clock time it was written);
- **nginx as a reverse proxy**: one worker, ``upstream { keepalive 64; }``,
  ``proxy_http_version 1.1``, ``proxy_buffering off`` for ``/events``, X-Forwarded-For/-Proto
  and Host set as pooled-proxy sets them, on one port for HTTP/1.1 and one for h2c;
- **HAProxy** (one thread, ``http-reuse always``) and **Caddy** (``GOMAXPROCS=1``, 64 idle
  upstream connections, ``flush_interval -1`` for ``/events``), set up as nginx is; they take
  the throughput rows (HTTP/1.1 GET and POST, h2c), nginx and pooled-proxy every row;
- **pooled-proxy**: ``pooled-proxy run`` with ``workers = 1``, the access log off, everything
  else on (metrics and the admin listener included), ``max_idle = 64`` to match nginx's
  ``keepalive 64``.

The proxies are pinned to CPU 0 (``taskset``); this script, the load generators and the
upstreams run on CPU 1. Each run measures, for direct / nginx / pooled-proxy:

- HTTP/1.1 keep-alive: ``wrk -t1 -c64 -d10s --latency``: the proxy's CPU time per request
  (``/proc/PID/schedstat``), req/s, p50, p99; the same with a 100-byte POST body;
- h2c: ``h2load -c16 -m10 -D10``: CPU per request, req/s;
- 2 workers vs 1 (pooled-proxy only): a second pooled-proxy with ``workers = 2`` and the
  one-worker proxy, one after the other under ``wrk -c64`` and ``h2load -c16 -m10`` for 5 s
  each, with nothing pinned (the one-worker proxy and the upstream are moved to every CPU
  for these runs). Two CPUs cannot show what 2 workers serve against 1 (the load generator
  needs one), so the figure judged is what 2 would serve with a core each, in units of one
  worker: one worker's CPU per request over the CPU the busiest of the 2 spent per request
  of the group (2.0 if the work splits evenly and costs the same); beside it each one's CPU
  per request, the busiest worker's share of the CPU and of the connections (counted half
  way through from ``/proc``), and req/s;
- every request queued: ``wrk -c256`` against ``/queued``, which pooled-proxy sends to an
  upstream of ``max_connections = 100`` (HAProxy: ``maxconn 100``), so that requests wait
  in its queue for a connection to come back; nginx and Caddy have no queue and are measured
  at ``-c256`` the same way;
- SSE: per-event latency (upstream write -> client has the event) and time to the first
  event (request sent on a new connection -> first event), p50 and p99, and what each proxy
  adds to the direct figure; the three paths run at the same time, so they share the load;
- memory (proxies only): RSS idle after start; peak RSS while a 1 GiB body streams through;
  RSS with 10,000 idle keep-alive client connections open (each has had one request).

It prints each run, then a table of medians with the ratios pooled-proxy / nginx and the
goals set for one worker (CPU per request is the headline) and for 2 workers against 1.
``--workers N`` runs pooled-proxy with N worker processes (on every CPU when N > 1, sharing
them with the load generator; the 2-vs-1 rows are left out then). ``--scaling-duration 0``
leaves them out too. ``--json FILE`` keeps the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import h11
import trio

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
PROXY_CPU, LOAD_CPU = 0, 1
BODY = b"x" * 99 + b"\n"  # the upstream's 100-byte answer
BIG_BYTES = 1 << 30
MIB = 1024 * 1024
TOOLS = {
    "nginx": "nginx",
    "haproxy": "haproxy",
    "caddy": "caddy",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "taskset": "util-linux",
}
# The proxies measured side by side, in the table's column order. HAProxy and Caddy take the
# throughput rows (HTTP/1.1 GET and POST, h2c); nginx and pooled-proxy every row.
PROXIES = ("nginx", "haproxy", "caddy", "pooled")
PEERS = ("haproxy", "caddy")

# The goals for one worker: the proxy's CPU time per request (the headline: req/s on two cores
# is capped by the load generator's core), latency and memory.
GOAL_H1_GET_US = 60.0
GOAL_H1_POST_US = 70.0
GOAL_H2_GET_US = 130.0
GOAL_QUEUED_OVER_GET_US = 15.0  # a request that waits in the pool's queue, over a plain GET
GOAL_SSE_EVENT_P99_MS = 0.5
GOAL_SSE_FIRST_MS = 3.0
GOAL_IDLE_MIB = 40
GOAL_IDLE_CONNS_MIB = 200
GOAL_STREAM_MIB = 64
# 2 workers against 1 (nothing pinned): what 2 would serve with a core each, in units of one
# worker's requests (measure_scaling).
GOAL_SCALING = 1.9

# The queued row: more clients than upstream connections, so that (nearly) every request
# waits in pooled-proxy's queue for one to come back; HAProxy queues the same way (its
# server's maxconn), nginx and Caddy have no such queue and open what they need.
QUEUE_PATH = "/queued"
QUEUE_CLIENTS = 256
QUEUE_CONNECTIONS = 100
# The same load on pooled-proxy with connections enough for every client: what 256 clients
# cost without the queue.
UNQUEUED_PATH = "/unqueued"


# -- set-up ------------------------------------------------------------------------------------


def ensure_tools() -> None:
    missing = sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    print(f"installing {' '.join(missing)} (apt) ...", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def idle_connections_that_fit() -> int:
    """The most idle client connections the file limit lets every proxy hold: HAProxy
    (``maxconn`` = connections + 1024, below) refuses to start unless the hard limit covers
    two descriptors per connection and some of its own."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return sys.maxsize
    return (hard - 256) // 2 - 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    text = log.read_text(errors="replace") if log.exists() else ""
    raise RuntimeError(f"{what} did not start listening on {port}:\n{text}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's workers, pooled-proxy's worker processes)."""
    pids = [pid]
    for index in range(len(pids) + 10_000):
        if index >= len(pids):
            break
        try:
            for task in os.listdir(f"/proc/{pids[index]}/task"):
                with open(f"/proc/{pids[index]}/task/{task}/children") as children:
                    pids += [int(child) for child in children.read().split()]
        except OSError:
            continue
    return pids


def status_kib(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pid: int) -> float:
    return sum(status_kib(p, "VmRSS") for p in tree_pids(pid)) / 1024


def pinned(cpu: int | str | None, argv: list[str]) -> list[str]:
    """``argv`` run on ``cpu`` (a CPU number or a ``taskset`` list); None: as this script runs."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


# Every CPU this script may use, read before it pins itself to LOAD_CPU: the scaling rows run
# their processes on all of them.
ALL_CPUS = frozenset(os.sched_getaffinity(0))
ALL_CPUS_LIST = ",".join(str(cpu) for cpu in sorted(ALL_CPUS))


def thread_ids(pids: Iterable[int]) -> Iterator[int]:
    """Every thread of ``pids`` that still exists."""
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        yield from map(int, tasks)


def run_each(names: Sequence[str], run: Callable[[str], object], *, together: bool) -> None:
    """``run(name)`` for each of ``names``: one after another, or all at once in threads (side
    by side, sharing whatever else the machine does in those seconds)."""
    if not together:
        for name in names:
            run(name)
        return
    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def set_affinity(pid: int, cpus: Iterable[int]) -> None:
    """Move every thread of ``pid`` and its descendants to ``cpus``."""
    for task in thread_ids(tree_pids(pid)):
        try:
            os.sched_setaffinity(task, set(cpus))
        except OSError:
            pass  # the thread has ended


# -- the processes -------------------------------------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    upstream_port: int = 0
    upstream_h2_port: int = 0
    sse_port: int = 0
    nginx_port: int = 0
    nginx_h2_port: int = 0
    haproxy_port: int = 0
    haproxy_h2_port: int = 0
    caddy_port: int = 0
    proxy_port: int = 0
    admin_port: int = 0
    proxy2_port: int = 0  # the scaling rows' pooled-proxy with 2 workers
    admin2_port: int = 0
    upstream_pid: int = 0
    nginx_pid: int = 0
    haproxy_pid: int = 0
    caddy_pid: int = 0
    proxy_pid: int = 0
    proxy2_pid: int = 0


def nginx_prelude(workdir: Path, name: str, *, connections: int) -> str:
    temp = workdir / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
worker_rlimit_nofile {connections * 2 + 1024};
events {{ worker_connections {connections + 512}; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
"""


def upstream_nginx_conf(setup: Setup, big_file: Path) -> str:
    return (
        nginx_prelude(setup.workdir, "upstream", connections=4096)
        + f"""
    server {{
        listen {HOST}:{setup.upstream_port};
        listen {HOST}:{setup.upstream_h2_port} http2;
        default_type text/plain;
        location / {{ return 200 "{BODY.decode().rstrip()}\\n"; }}
        location = /big {{ alias {big_file}; default_type application/octet-stream; }}
    }}
}}
"""
    )


def proxy_nginx_conf(setup: Setup, *, connections: int) -> str:
    common = """proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;"""
    return (
        nginx_prelude(setup.workdir, "proxy", connections=connections)
        + f"""
    upstream fast {{ server {HOST}:{setup.upstream_port}; keepalive 64; keepalive_requests 1000000; }}
    upstream sse {{ server {HOST}:{setup.sse_port}; keepalive 64; }}
    server {{
        listen {HOST}:{setup.nginx_port};
        listen {HOST}:{setup.nginx_h2_port} http2;
        http2_max_concurrent_streams 128;
        location / {{
            proxy_pass http://fast;
            {common}
        }}
        location /events {{
            proxy_pass http://sse;
            proxy_buffering off;
            {common}
        }}
    }}
}}
"""
    )


def haproxy_conf(setup: Setup, *, connections: int) -> str:
    """HAProxy as nginx is set up: one thread, keep-alive and reuse upstream, no buffering."""
    return f"""global
    nbthread 1
    maxconn {connections + 1024}
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    http-reuse always
    option forwardfor
frontend proxy
    bind {HOST}:{setup.haproxy_port}
    bind {HOST}:{setup.haproxy_h2_port} proto h2
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    use_backend sse if {{ path_beg /events }}
    use_backend queued if {{ path {QUEUE_PATH} }}
    default_backend fast
backend fast
    server upstream {HOST}:{setup.upstream_port} maxconn 64
backend queued
    server upstream {HOST}:{setup.upstream_port} maxconn {QUEUE_CONNECTIONS}
backend sse
    server upstream {HOST}:{setup.sse_port}
"""


def caddyfile(setup: Setup) -> str:
    """Caddy as nginx is set up: HTTP/1.1 and h2c on one port, 64 idle upstream connections."""
    return f"""{{
    admin off
    auto_https off
    servers {{
        protocols h1 h2c
    }}
}}
http://{HOST}:{setup.caddy_port} {{
    reverse_proxy /events* {HOST}:{setup.sse_port} {{
        flush_interval -1
    }}
    reverse_proxy {HOST}:{setup.upstream_port} {{
        transport http {{
            keepalive_idle_conns_per_host 64
        }}
    }}
}}
"""


def pooled_proxy_toml(
    setup: Setup, *, workers: int, connections: int, port: int, admin_port: int
) -> str:
    return f"""# written by bench/vs_nginx.py
[server]
listen = ["{HOST}:{port}"]
workers = {workers}
max_connections = {connections + 1024}

[admin]
listen = "{HOST}:{admin_port}"

[log]
access = "off"
level = "warning"

[upstreams.fast]
servers = ["{HOST}:{setup.upstream_port}"]
max_idle = 64          # nginx: upstream {{ keepalive 64; }}

[upstreams.sse]
servers = ["{HOST}:{setup.sse_port}"]

[upstreams.queued]
servers = ["{HOST}:{setup.upstream_port}"]
max_connections = {QUEUE_CONNECTIONS}
max_idle = {QUEUE_CONNECTIONS}

[upstreams.unqueued]
servers = ["{HOST}:{setup.upstream_port}"]
max_connections = {2 * QUEUE_CLIENTS}
max_idle = {2 * QUEUE_CLIENTS}

[[routes]]
path_prefix = "/events"
upstream = "sse"

[[routes]]
path_prefix = "{QUEUE_PATH}"
upstream = "queued"

[[routes]]
path_prefix = "{UNQUEUED_PATH}"
upstream = "unqueued"

[[routes]]
upstream = "fast"
"""


@contextmanager
def running_setup(args: argparse.Namespace) -> Iterator[Setup]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pp-bench-")))
        os.chmod(workdir, 0o755)
        setup = Setup(workdir)
        for name in (
            "upstream_port",
            "upstream_h2_port",
            "sse_port",
            "nginx_port",
            "nginx_h2_port",
            "haproxy_port",
            "haproxy_h2_port",
            "caddy_port",
            "proxy_port",
            "admin_port",
            "proxy2_port",
            "admin2_port",
        ):
            setattr(setup, name, free_port())
        big = workdir / "big.bin"
        with open(big, "wb") as handle:
            handle.truncate(BIG_BYTES)  # sparse: served by sendfile without touching a disk

        def start(
            argv: list[str], name: str, port: int, env: dict[str, str] | None = None
        ) -> subprocess.Popen[bytes]:
            log = workdir / f"{name}.log"
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stack.enter_context(open(log, "wb")),
                stdin=subprocess.DEVNULL,
            )
            stack.callback(stop, process)
            wait_for_port(port, process, name, log)
            return process

        load_cpu = None if args.no_pin else LOAD_CPU
        proxy_cpu = None if args.no_pin else PROXY_CPU
        (workdir / "upstream.conf").write_text(upstream_nginx_conf(setup, big))
        upstream = start(
            pinned(load_cpu, ["nginx", "-p", str(workdir), "-c", str(workdir / "upstream.conf")]),
            "upstream nginx",
            setup.upstream_port,
        )
        setup.upstream_pid = upstream.pid
        start(
            pinned(
                load_cpu,
                [
                    sys.executable,
                    "-m",
                    "pooled_proxy.daemon.demo_upstream",
                    "--port",
                    str(setup.sse_port),
                    "--event-interval",
                    "0.1",
                ],
            ),
            "SSE upstream",
            setup.sse_port,
        )
        (workdir / "proxy.conf").write_text(
            proxy_nginx_conf(setup, connections=args.idle_connections)
        )
        nginx = start(
            pinned(proxy_cpu, ["nginx", "-p", str(workdir), "-c", str(workdir / "proxy.conf")]),
            "nginx proxy",
            setup.nginx_port,
        )
        setup.nginx_pid = nginx.pid
        (workdir / "haproxy.cfg").write_text(haproxy_conf(setup, connections=args.idle_connections))
        haproxy = start(
            pinned(proxy_cpu, ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")]),
            "haproxy",
            setup.haproxy_port,
        )
        setup.haproxy_pid = haproxy.pid
        (workdir / "Caddyfile").write_text(caddyfile(setup))
        caddy = start(
            pinned(
                proxy_cpu,
                ["caddy", "run", "--adapter", "caddyfile", "--config", str(workdir / "Caddyfile")],
            ),
            "caddy",
            setup.caddy_port,
            # One core, as the others get; HOME for the data directory Caddy insists on.
            env={
                **os.environ,
                "GOMAXPROCS": "1",
                "HOME": str(workdir),
                "XDG_DATA_HOME": str(workdir),
            },
        )
        setup.caddy_pid = caddy.pid

        def start_pooled(name: str, workers: int, port: int, admin_port: int, cpu: int | str | None
                         ) -> int:  # fmt: skip
            (workdir / f"{name}.toml").write_text(
                pooled_proxy_toml(
                    setup,
                    workers=workers,
                    connections=args.idle_connections,
                    port=port,
                    admin_port=admin_port,
                )
            )
            argv = [
                sys.executable,
                "-m",
                "pooled_proxy",
                "run",
                "-c",
                str(workdir / f"{name}.toml"),
            ]
            proxy = start(pinned(cpu, argv), name, port)
            wait_for_port(admin_port, proxy, f"{name} admin", workdir / f"{name}.log")
            return proxy.pid

        # More than one worker: on every CPU, sharing them with the load generator.
        setup.proxy_pid = start_pooled(
            "pooled-proxy",
            args.workers,
            setup.proxy_port,
            setup.admin_port,
            proxy_cpu if args.workers == 1 else ALL_CPUS_LIST,
        )
        if args.scaling:
            setup.proxy2_pid = start_pooled(
                "pooled-proxy-2", 2, setup.proxy2_port, setup.admin2_port, ALL_CPUS_LIST
            )
        time.sleep(0.5)  # let both settle (imports, first GC) before the idle figure
        yield setup


# -- load: wrk and h2load --------------------------------------------------------------------------


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected duration {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def cpu_ns(pid: int | None, *, tree: bool = True) -> int:
    """CPU time a process tree (or with ``tree=False`` the process alone) has used so far,
    every thread counted (Caddy's Go runtime works on threads other than the main one), from
    ``/proc/PID/task/TID/schedstat``, in nanoseconds."""
    total = 0
    for task in thread_ids((tree_pids(pid) if tree else [pid]) if pid else ()):
        try:
            with open(f"/proc/{task}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
        except OSError:
            pass
    return total


def queue_counts(admin_port: int, upstream: str) -> tuple[int, int]:
    """pooled-proxy's requests to ``upstream`` so far and how many of them waited in its queue,
    from the admin listener's ``/upstreams``."""
    with socket.create_connection((HOST, admin_port), timeout=5) as sock:
        sock.sendall(b"GET /upstreams HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    for group in body["upstreams"]:
        if group["name"] == upstream:
            servers = group["servers"]
            return (
                sum(server["requests"] for server in servers),
                sum(server["queue"]["waited"] for server in servers),
            )
    raise RuntimeError(f"no upstream {upstream!r} in pooled-proxy's /upstreams")


# wrk's request for the upload row: a 100-byte POST, as an API call or a form sends.
POST_LUA = """wrk.method = "POST"
wrk.body = string.rep("x", 100)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def run_load(argv: list[str], seconds: float, probe: Callable[[], None] | None) -> str:
    """Run a load generator to its end, its output; ``probe`` is called half way through."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as load:
        if probe is not None:
            time.sleep(seconds / 2)
            probe()
        out, err = load.communicate()
    if load.returncode:
        raise RuntimeError(f"{argv[0]} failed ({load.returncode}):\n{out}{err}")
    return out


def run_wrk(
    port: int,
    seconds: float,
    cpu: int | str | None,
    pid: int | None = None,
    script: Path | None = None,
    *,
    connections: int = 64,
    path: str = "/",
    probe: Callable[[], None] | None = None,
) -> dict[str, float]:
    before = cpu_ns(pid)
    extra = ["-s", str(script)] if script is not None else []
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    out = run_load(
        pinned(cpu, [*argv, *extra, f"http://{HOST}:{port}{path}"]), max(1, round(seconds)), probe
    )
    used = cpu_ns(pid) - before
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        print(f"    wrk on {port}: {errors.group(0)}", flush=True)
    if len(latency) < 2:
        print(f"    wrk on {port}: no latency distribution:\n{out}", flush=True)
    return {
        "rps": rps,
        "p50_ms": _duration_ms(latency["50"]) if "50" in latency else float("nan"),
        "p99_ms": _duration_ms(latency["99"]) if "99" in latency else float("nan"),
        "cpu_us": used / 1000 / requests if pid and requests else float("nan"),
    }


def run_h2load(
    port: int,
    seconds: float,
    cpu: int | str | None,
    pid: int | None = None,
    *,
    probe: Callable[[], None] | None = None,
) -> dict[str, float]:
    before = cpu_ns(pid)
    whole = max(1, round(seconds))
    out = run_load(
        pinned(cpu, ["h2load", "-c16", "-m10", f"-D{whole}", f"http://{HOST}:{port}/"]),
        whole,
        probe,
    )
    if "Application protocol: h2c" not in out:
        raise RuntimeError(f"h2load did not speak h2c to {port}:\n{out}")
    used = cpu_ns(pid) - before
    rps = float(re.search(r"finished in [0-9.]+\w+, ([0-9.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done", out).group(1))  # type: ignore[union-attr]
    failed = re.search(r"requests: .*?(\d+) failed, (\d+) errored", out)
    if failed and (failed.group(1) != "0" or failed.group(2) != "0"):
        print(f"    h2load on {port}: {failed.group(0)}", flush=True)
    return {"rps": rps, "cpu_us": used / 1000 / done if pid and done else float("nan")}


# -- scaling: 2 workers vs 1 -------------------------------------------------------------------


def established_inodes(port: int) -> set[int]:
    """The socket inodes of the established TCP connections whose local port is ``port``."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def connections_per_process(pids: Sequence[int], port: int) -> list[int]:
    """How many of the established connections to ``port`` each of ``pids`` holds."""
    inodes = established_inodes(port)
    counts = []
    for pid in pids:
        held = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in inodes:
                held += 1
        counts.append(held)
    return counts


def scaling_load(
    proto: str, port: int, pid: int, args: argparse.Namespace
) -> tuple[dict[str, float], dict[int, int], list[int]]:
    """One scaling run on every CPU against ``port`` after a warm-up: wrk's or h2load's
    figures, the CPU each process of ``pid``'s tree used (ns), and the connections each
    worker held half way through (the supervisor first in the tree, when there is one)."""
    pids = tree_pids(pid)
    workers = pids[1:] if len(pids) > 1 else pids
    held: list[int] = []

    def probe() -> None:
        held[:] = connections_per_process(workers, port)

    run = run_wrk if proto == "h1" else run_h2load
    run(port, args.warmup, ALL_CPUS_LIST)
    before = {p: cpu_ns(p, tree=False) for p in pids}
    measured = run(port, args.scaling_duration, ALL_CPUS_LIST, pid, probe=probe)
    used = {p: cpu_ns(p, tree=False) - first for p, first in before.items()}
    return measured, used, held


def measure_scaling(setup: Setup, args: argparse.Namespace) -> dict[str, float]:
    """pooled-proxy with 1 worker and with 2 under the same load, everything on every CPU.

    Two CPUs cannot show 2 workers' req/s against 1 (the load generator needs one), so the
    figure judged is what they would serve with a core each: one worker's CPU per request
    over the CPU the busiest of the 2 spent per request of the group. It is 2.0 when the
    work splits evenly and a request costs the same in either; it falls with any overhead
    of a second worker (the supervisor's CPU is counted in the group's CPU per request, not
    in the busiest worker's) and with an uneven spread.
    """
    results: dict[str, float] = {}
    if not args.no_pin:  # the 1-worker proxy and the upstream join the 2-worker one on every CPU
        set_affinity(setup.proxy_pid, ALL_CPUS)
        set_affinity(setup.upstream_pid, ALL_CPUS)
    try:
        for proto in ("h1", "h2"):
            one, _, _ = scaling_load(proto, setup.proxy_port, setup.proxy_pid, args)
            two, used, held = scaling_load(proto, setup.proxy2_port, setup.proxy2_pid, args)
            key = f"pooled.scale_{proto}"
            results[f"{key}_1w_rps"], results[f"{key}_1w_cpu_us"] = one["rps"], one["cpu_us"]
            results[f"{key}_2w_rps"], results[f"{key}_2w_cpu_us"] = two["rps"], two["cpu_us"]
            workers = [cpu for p, cpu in used.items() if p != setup.proxy2_pid]
            busiest_us = two["cpu_us"] * max(workers) / max(1, sum(used.values()))
            results[f"{key}_2w_busiest_pct"] = 100 * max(workers) / max(1, sum(workers))
            results[f"{key}_2w_supervisor_pct"] = (
                100 * used[setup.proxy2_pid] / max(1, sum(used.values()))
            )
            results[f"{key}_2w_conns_busiest_pct"] = (
                100 * max(held) / max(1, sum(held)) if held else float("nan")
            )
            for index, count in enumerate(held):
                results[f"{key}_2w_conns{index}"] = count
            results[f"{key}_x"] = one["cpu_us"] / busiest_us if busiest_us else float("nan")
    finally:
        if not args.no_pin:
            set_affinity(setup.proxy_pid, {PROXY_CPU})
            set_affinity(setup.upstream_pid, {LOAD_CPU})
    return results


# -- SSE -----------------------------------------------------------------------------------------


@dataclass
class SseTimings:
    events_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)


def _event_times(data: bytes, buffer: bytearray, now: float) -> Iterator[float]:
    """Latency of each complete event in the stream so far (``t`` is the upstream's stamp)."""
    buffer += data
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return
        block = bytes(buffer[:end])
        del buffer[: end + 2]
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                yield (now - json.loads(line[6:])["t"]) * 1000


async def _sse_request(port: int, path: bytes) -> tuple[trio.SocketStream, h11.Connection, float]:
    stream = await trio.open_tcp_stream(HOST, port)
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target=path, headers=[("host", "bench"), ("accept", "text/event-stream")]
    )
    sent = time.time()
    await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    return stream, connection, sent


async def _sse_stream(port: int, seconds: float, timings: SseTimings) -> None:
    """One long stream: the latency of every event but the first (that one is first_ms's)."""
    stream, connection, _ = await _sse_request(port, b"/events")
    buffer = bytearray()
    seen = 0
    with trio.move_on_after(seconds):
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                now = time.time()
                if not data:
                    return
                connection.receive_data(data)
                while True:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        break
                    if isinstance(event, h11.Data):
                        for latency in _event_times(bytes(event.data), buffer, now):
                            if seen:
                                timings.events_ms.append(latency)
                            seen += 1
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        return


async def _sse_first_events(port: int, count: int, timings: SseTimings) -> None:
    """New connection, request, first event: ``count`` times, one after another."""
    for _ in range(count):
        stream, connection, sent = await _sse_request(port, b"/events?count=1")
        buffer = bytearray()
        async with stream:
            done = False
            while not done:
                data = await stream.receive_some(65536)
                now = time.time()
                if not data:
                    break
                connection.receive_data(data)
                while not done:
                    event = connection.next_event()
                    if event is h11.NEED_DATA:
                        break
                    if isinstance(event, h11.Data) and any(
                        True for _ in _event_times(bytes(event.data), buffer, now)
                    ):
                        timings.first_ms.append((now - sent) * 1000)
                        done = True
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        done = True
        await trio.sleep(0.05)


def run_sse(
    ports: dict[str, int], seconds: float, streams: int, firsts: int
) -> dict[str, SseTimings]:
    timings = {name: SseTimings() for name in ports}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name, port in ports.items():
                for index in range(streams):
                    nursery.start_soon(_sse_stream, port, seconds, timings[name])
        async with trio.open_nursery() as nursery:
            for name, port in ports.items():
                nursery.start_soon(_sse_first_events, port, firsts, timings[name])

    trio.run(main)
    return timings


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# -- memory ----------------------------------------------------------------------------------------


class PeakSampler:
    """The peak RSS of a process tree, sampled every 5 ms on a thread (and VmHWM, reset)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib(self.pid))

    def __enter__(self) -> Self:
        for pid in tree_pids(self.pid):
            try:  # "5" resets VmHWM to the current RSS (Linux 4.0+)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        self.peak = rss_mib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = sum(status_kib(p, "VmHWM") for p in tree_pids(self.pid)) / 1024
        self.peak = max(self.peak, hwm)


def stream_big(port: int, pid: int) -> tuple[float, float]:
    """Download /big (1 GiB) through the proxy; returns (peak RSS MiB, MiB/s)."""
    with PeakSampler(pid) as sampler:
        started = time.monotonic()
        with socket.create_connection((HOST, port)) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            received = 0
            buffer = bytearray(1 << 20)
            while n := sock.recv_into(buffer):
                received += n
        elapsed = time.monotonic() - started
    if received < BIG_BYTES:
        raise RuntimeError(f"/big through {port}: only {received} bytes")
    return sampler.peak, received / MIB / elapsed


def idle_connections_rss(port: int, pid: int, count: int) -> float:
    """Open ``count`` keep-alive connections, one request each, and keep them idle; RSS MiB."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    socks: list[socket.socket] = []
    try:
        batch = 250
        for start in range(0, count, batch):
            new = [socket.create_connection((HOST, port)) for _ in range(min(batch, count - start))]
            socks += new
            for sock in new:
                sock.sendall(request)
            for sock in new:
                reply = b""
                while not (reply.endswith(BODY) and b"\r\n\r\n" in reply):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise RuntimeError(
                            f"connection {len(socks)} of {count} closed: {reply[:200]!r}"
                        )
                    reply += chunk
        time.sleep(1.0)
        return rss_mib(pid)
    finally:
        for sock in socks:
            sock.close()
        time.sleep(1.0)  # let the proxy notice and free them before the next measurement


# -- one run -------------------------------------------------------------------------------------


def one_run(args: argparse.Namespace, number: int) -> dict[str, float]:
    results: dict[str, float] = {}
    load_cpu = None if args.no_pin else LOAD_CPU
    with running_setup(args) as setup:
        targets = {
            "nginx": setup.nginx_pid,
            "haproxy": setup.haproxy_pid,
            "caddy": setup.caddy_pid,
            "pooled": setup.proxy_pid,
        }
        h1_ports = {
            "direct": setup.upstream_port,
            "nginx": setup.nginx_port,
            "haproxy": setup.haproxy_port,
            "caddy": setup.caddy_port,
            "pooled": setup.proxy_port,
        }
        h2_ports = {
            "direct": setup.upstream_h2_port,
            "nginx": setup.nginx_h2_port,
            "haproxy": setup.haproxy_h2_port,
            "caddy": setup.caddy_port,
            "pooled": setup.proxy_port,
        }
        # Memory and SSE: nginx and pooled-proxy only (the throughput rows compare all four).
        compared = {name: pid for name, pid in targets.items() if name not in PEERS}
        for name, pid in compared.items():
            results[f"{name}.rss_idle_mib"] = rss_mib(pid)
        for name, pid in compared.items():
            port = h1_ports[name]
            results[f"{name}.rss_stream_peak_mib"], results[f"{name}.stream_mib_s"] = stream_big(
                port, pid
            )
        for name, port in h1_ports.items():
            run_wrk(port, args.warmup, load_cpu)
            for key, value in run_wrk(port, args.duration, load_cpu, targets.get(name)).items():
                results[f"{name}.h1_{key}"] = value
        post = setup.workdir / "post.lua"
        post.write_text(POST_LUA)
        for name, port in h1_ports.items():
            run_wrk(port, args.warmup, load_cpu, script=post)
            for key, value in run_wrk(
                port, args.duration, load_cpu, targets.get(name), post
            ).items():
                results[f"{name}.post_{key}"] = value
        for name, port in h2_ports.items():
            run_h2load(port, args.warmup, load_cpu)
            for key, value in run_h2load(port, args.duration, load_cpu, targets.get(name)).items():
                results[f"{name}.h2_{key}"] = value
        if args.scaling:
            results.update(measure_scaling(setup, args))
        # Every request queued: more clients than pooled-proxy's upstream connections; what it
        # costs over the GET above. The share that waited is read from its admin listener.
        for name, port in h1_ports.items():
            run_wrk(port, args.warmup, load_cpu, connections=QUEUE_CLIENTS, path=QUEUE_PATH)
            if name == "pooled":
                before = queue_counts(setup.admin_port, "queued")
            measured = run_wrk(
                port,
                args.duration,
                load_cpu,
                targets.get(name),
                connections=QUEUE_CLIENTS,
                path=QUEUE_PATH,
            )
            for key, value in measured.items():
                results[f"{name}.queued_{key}"] = value
            if name == "pooled":
                requests, waited = (
                    after - first
                    for after, first in zip(queue_counts(setup.admin_port, "queued"), before)
                )
                results["pooled.queued_share_pct"] = 100 * waited / max(1, requests)
        run_wrk(
            setup.proxy_port, args.warmup, load_cpu, connections=QUEUE_CLIENTS, path=UNQUEUED_PATH
        )
        measured = run_wrk(
            setup.proxy_port,
            args.duration,
            load_cpu,
            setup.proxy_pid,
            connections=QUEUE_CLIENTS,
            path=UNQUEUED_PATH,
        )
        for key, value in measured.items():
            results[f"pooled.unqueued_{key}"] = value
        sse = run_sse(
            {"direct": setup.sse_port, "nginx": setup.nginx_port, "pooled": setup.proxy_port},
            args.sse_seconds,
            args.sse_streams,
            args.sse_first,
        )
        for name, timing in sse.items():
            results[f"{name}.sse_event_p50_ms"] = percentile(timing.events_ms, 0.50)
            results[f"{name}.sse_event_p99_ms"] = percentile(timing.events_ms, 0.99)
            results[f"{name}.sse_first_p50_ms"] = percentile(timing.first_ms, 0.50)
            results[f"{name}.sse_first_p99_ms"] = percentile(timing.first_ms, 0.99)
            results[f"{name}.sse_events"] = len(timing.events_ms)
        for name, pid in compared.items():
            results[f"{name}.rss_idle_conns_mib"] = idle_connections_rss(
                h1_ports[name], pid, args.idle_connections
            )
    print(
        f"run {number}: " + ", ".join(f"{key}={value:.4g}" for key, value in results.items()),
        flush=True,
    )
    return results


# -- the report ----------------------------------------------------------------------------------


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = (
        subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        .stderr.strip()
        .split("/")[-1]
    )
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
    caddy = subprocess.run(["caddy", "version"], capture_output=True, text=True).stdout.split()[0]
    try:
        import h11_mypyc

        accel = "h11_mypyc " + getattr(h11_mypyc, "__version__", "?")
    except ImportError:
        accel = "h11 " + h11.__version__ + " (pure Python)"
    return (
        f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPU(s) {model}, "
        f"Linux {platform.release()}, Python {platform.python_version()}, {accel}, nginx {nginx}, "
        f"HAProxy {haproxy}, Caddy {caddy}"
    )


def report(runs: list[dict[str, float]], args: argparse.Namespace) -> str:
    med = {key: statistics.median(run[key] for run in runs) for key in runs[0]}

    def get(name: str, key: str) -> float:
        return med.get(f"{name}.{key}", float("nan"))

    rows: list[tuple[str, list[float], str, str]] = []  # label, direct and proxies, ratio, goal

    def row(
        label: str,
        key: str,
        digits: int,
        *,
        ratio: bool = False,
        goal: str = "",
        met: Callable[[float], bool] | None = None,
    ) -> None:
        """``ratio``: pooled-proxy / nginx; ``met`` judges pooled-proxy's figure."""
        values = [get(name, key) for name in ("direct", *PROXIES)]
        n, p = get("nginx", key), get("pooled", key)
        r = f"{p / n:.2f}" if ratio and n and not math.isnan(n) and not math.isnan(p) else ""
        verdict = ""
        if met is not None:
            verdict = goal + (": met" if met(p) else ": MISSED")
        rows.append((label, values, r, verdict))
        fmt[label] = digits

    def throughput(label: str, key: str, goal_us: float, goal: str) -> None:
        """A path's CPU per request (the headline, with its goal), then req/s and p99."""
        row(
            f"{label}: proxy CPU us/request",
            f"{key}_cpu_us",
            1,
            ratio=True,
            goal=goal,
            met=lambda p: p <= goal_us,
        )
        row(f"{label}: req/s", f"{key}_rps", 0, ratio=True)
        if any(f"{name}.{key}_p99_ms" in med for name in PROXIES):
            row(f"{label}: p99 ms", f"{key}_p99_ms", 2, ratio=True)

    fmt: dict[str, int] = {}
    throughput("HTTP/1.1 GET (wrk -c64)", "h1", GOAL_H1_GET_US, f"<= {GOAL_H1_GET_US:g} us")
    throughput(
        "HTTP/1.1 POST 100 B (wrk -c64)", "post", GOAL_H1_POST_US, f"<= {GOAL_H1_POST_US:g} us"
    )
    throughput("h2c GET (h2load -c16 -m10)", "h2", GOAL_H2_GET_US, f"<= {GOAL_H2_GET_US:g} us")
    queued_goal = get("pooled", "h1_cpu_us") + GOAL_QUEUED_OVER_GET_US
    throughput(
        f"HTTP/1.1 with every request queued (wrk -c{QUEUE_CLIENTS}, "
        f"max_connections {QUEUE_CONNECTIONS})",
        "queued",
        queued_goal,
        f"<= GET + {GOAL_QUEUED_OVER_GET_US:g} us ({_fmt(queued_goal, 0)})",
    )
    row("pooled-proxy requests that waited in the queue %", "queued_share_pct", 1)
    row(
        f"pooled-proxy, the same without a queue (max_connections {2 * QUEUE_CLIENTS}): "
        "CPU us/request",
        "unqueued_cpu_us",
        1,
    )
    scalings = [("h1", "HTTP/1.1 (wrk -c64)"), ("h2", "h2c (h2load -c16 -m10)")]
    for proto, label in scalings if args.scaling else ():
        key = f"scale_{proto}"
        row(
            f"2 workers vs 1, {label}, nothing pinned: scaling x",
            f"{key}_x",
            2,
            goal=f">= {GOAL_SCALING:g}x",
            met=lambda p: p >= GOAL_SCALING,
        )
        row(f"{label}: CPU us/request, 1 worker", f"{key}_1w_cpu_us", 1)
        row(f"{label}: CPU us/request, 2 workers (supervisor included)", f"{key}_2w_cpu_us", 1)
        row(
            f"{label}: 2 workers, the busiest one's share of their CPU %",
            f"{key}_2w_busiest_pct",
            1,
        )
        row(
            f"{label}: 2 workers, the busiest one's share of the connections %",
            f"{key}_2w_conns_busiest_pct",
            1,
        )
        row(f"{label}: req/s, 1 worker", f"{key}_1w_rps", 0)
        row(f"{label}: req/s, 2 workers", f"{key}_2w_rps", 0)
    row("SSE per-event latency p50 ms", "sse_event_p50_ms", 3)
    row(
        "SSE per-event latency p99 ms",
        "sse_event_p99_ms",
        3,
        goal=f"<= direct + {GOAL_SSE_EVENT_P99_MS:g} ms",
        met=lambda p: p - get("direct", "sse_event_p99_ms") <= GOAL_SSE_EVENT_P99_MS,
    )
    row(
        "SSE first event p50 ms",
        "sse_first_p50_ms",
        2,
        goal=f"<= direct + {GOAL_SSE_FIRST_MS:g} ms",
        met=lambda p: p - get("direct", "sse_first_p50_ms") <= GOAL_SSE_FIRST_MS,
    )
    row("SSE first event p99 ms", "sse_first_p99_ms", 2)
    row(
        "RSS idle MiB",
        "rss_idle_mib",
        1,
        goal=f"<= {GOAL_IDLE_MIB} MiB",
        met=lambda p: p <= GOAL_IDLE_MIB,
    )
    row(
        f"RSS, {args.idle_connections:,} idle conns MiB",
        "rss_idle_conns_mib",
        1,
        goal=f"<= {GOAL_IDLE_CONNS_MIB} MiB",
        met=lambda p: p <= GOAL_IDLE_CONNS_MIB,
    )
    row(
        "RSS peak, 1 GiB stream MiB",
        "rss_stream_peak_mib",
        1,
        goal=f"<= {GOAL_STREAM_MIB} MiB",
        met=lambda p: p <= GOAL_STREAM_MIB,
    )
    row("1 GiB stream MiB/s", "stream_mib_s", 0)

    lines = [
        f"pooled-proxy vs nginx: {machine_line()}",
        f"{len(runs)} run(s) x {args.duration:g} s, medians; "
        + (
            "nothing pinned to a CPU"
            if args.no_pin
            else f"proxies pinned to CPU {PROXY_CPU}, load and upstreams on CPU {LOAD_CPU}"
        )
        + f"; pooled-proxy workers = {args.workers}",
        "",
        "| measure | direct | nginx | HAProxy | Caddy | pooled-proxy | pooled/nginx | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, values, r, verdict in rows:
        cells = " | ".join(_fmt(value, fmt[label]) for value in values)
        lines.append(f"| {label} | {cells} | {r} | {verdict} |")
    added = [
        ("SSE added per event p50 / p99 ms", "sse_event_p50_ms", "sse_event_p99_ms", 3),
        ("SSE added to first event p50 / p99 ms", "sse_first_p50_ms", "sse_first_p99_ms", 2),
    ]
    lines.append("")
    for label, k50, k99, digits in added:
        parts = []
        for name in ("nginx", "pooled"):
            a50 = get(name, k50) - get("direct", k50)
            a99 = get(name, k99) - get("direct", k99)
            parts.append(f"{name} {_fmt(a50, digits)} / {_fmt(a99, digits)}")
        lines.append(f"{label}: " + "; ".join(parts))
    for proto, label in scalings if args.scaling else ():
        spread = ", ".join(
            "+".join(str(round(run.get(f"pooled.scale_{proto}_2w_conns{i}", 0))) for i in (0, 1))
            for run in runs
        )
        lines.append(f"{label}, connections per worker of 2 (each run): {spread}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs; the table shows medians (3)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per wrk/h2load run (10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of unmeasured load first (1)"
    )
    parser.add_argument(
        "--sse-seconds", type=float, default=10.0, help="length of the SSE streams (10)"
    )
    parser.add_argument(
        "--sse-streams", type=int, default=10, help="concurrent SSE streams per path (10)"
    )
    parser.add_argument(
        "--sse-first", type=int, default=50, help="first-event samples per path (50)"
    )
    parser.add_argument(
        "--idle-connections", type=int, default=10_000, help="idle client connections (10000)"
    )
    parser.add_argument("--workers", type=int, default=1, help="pooled-proxy worker processes (1)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument(
        "--scaling-duration",
        type=float,
        default=5.0,
        help="seconds per load run of the 2-workers-vs-1 rows (5); 0 skips them",
    )
    parser.add_argument("--quick", action="store_true", help="1 run, 3 s each: a smoke test")
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.duration, args.warmup, args.sse_seconds, args.sse_first = (
            1,
            3.0,
            1.0,
            3.0,
            20,
        )
        args.scaling_duration = min(args.scaling_duration, 3.0)
    # The scaling rows compare a second pooled-proxy of 2 workers with the one-worker proxy.
    args.scaling = args.scaling_duration > 0 and args.workers == 1
    if (os.cpu_count() or 1) < 2 and not args.no_pin:
        print("one CPU only: running unpinned", file=sys.stderr)
        args.no_pin = True
    ensure_tools()
    fit = idle_connections_that_fit()
    if args.idle_connections > fit:
        print(
            f"--idle-connections {args.idle_connections:,} lowered to {fit:,}: HAProxy opens two"
            " descriptors per connection and this machine's file limit is"
            f" {resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}",
            file=sys.stderr,
        )
        args.idle_connections = fit
    raise_fd_limit(args.idle_connections * 2 + 4096)
    if not args.no_pin:
        os.sched_setaffinity(
            0, {LOAD_CPU}
        )  # this script's own clients run beside the load generators
    runs = [one_run(args, number + 1) for number in range(args.repeat)]
    text = report(runs, args)
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "machine": machine_line()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
