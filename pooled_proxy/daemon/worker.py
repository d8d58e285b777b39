"""A worker process of the supervisor (workers.py): reads its config on stdin, serves it on
the supervisor's ports, and drains when the supervisor goes away."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from dataclasses import replace
from pathlib import Path

import trio

from ..config import Config, parse_address, parse_config
from ..server import group
from .runtime import tune_gc_for_serving
from .serve import configure_logging, run_with_operations
from .workers import EXIT_OK, EXIT_RUNTIME, WORKER_ENV, WorkerSpec

LOG = logging.getLogger("pooled_proxy.workers")


async def _drain_when_orphaned() -> None:
    """The supervisor holds our stdin open; EOF means it is gone: drain like on SIGTERM."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(4096):
            pass
    LOG.warning("supervisor gone: draining")
    os.kill(os.getpid(), signal.SIGTERM)


async def _serve_worker(config: Config, launch: Config, path: str, report_fd: int) -> None:
    link = socket.socket(fileno=report_fd) if report_fd >= 0 else None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_when_orphaned)
        await run_with_operations(
            config, config_path=path, launch_config=launch, supervisor_link=link
        )
        nursery.cancel_scope.cancel()


def worker_config(spec: WorkerSpec, text: str) -> tuple[Config, Config]:
    """(what this worker runs, what the file said): listen addresses pinned to the
    supervisor's ports; no admin listener (the supervisor serves it for the group)."""
    launch = parse_config(text, spec.config_path, base_dir=Path(spec.config_path).parent)
    server = replace(launch.server, listen=tuple(parse_address(a) for a in spec.listen))
    if server.tls is not None:
        tls_listen = tuple(parse_address(a) for a in spec.tls_listen)
        server = replace(server, tls=replace(server.tls, listen=tls_listen))
    return replace(launch, server=server, admin=None), launch


def adopt_group(spec: WorkerSpec) -> None:
    """Take the supervisor's listening sockets and the group's connection counts."""
    inherited = group.WorkerGroup(group.ConnectionCounts(spec.counts_fd, spec.index))
    for addresses, fds in ((spec.listen, spec.listen_fds), (spec.tls_listen, spec.tls_listen_fds)):
        for text, fd in zip(addresses, fds, strict=True):
            address = parse_address(text)
            inherited.sockets[address.host, address.port] = socket.socket(fileno=fd)
    group.current = inherited


def worker_main() -> int:
    spec = WorkerSpec(**json.loads(os.environ[WORKER_ENV]))
    size = int(sys.stdin.buffer.readline())
    text = sys.stdin.buffer.read(size).decode()
    config, launch = worker_config(spec, text)
    configure_logging(config.log.level, tag=f"[worker {spec.index} pid {os.getpid()}]")
    adopt_group(spec)
    tune_gc_for_serving()
    try:
        trio.run(_serve_worker, config, launch, spec.config_path, spec.report_fd)
    except OSError as exc:
        LOG.error("%s", exc)
        return EXIT_RUNTIME
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(worker_main())
