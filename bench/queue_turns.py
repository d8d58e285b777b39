"""CPU of the HTTP/1.1 pool's queue, without sockets: tasks taking turns on its connections.

    cd TREE && python /path/to/bench/queue_turns.py [--tasks 256] [--connections 100]

``--tasks`` tasks each take a connection the way the forwarder does (``take_idle``, else
``acquire``), pass one checkpoint holding it (the exchange), give it back, and pass another
(the write to the client); with fewer connections than tasks, most of them wait in the
queue. It prints the CPU time per turn (acquire and release, and the two checkpoints) with
as many connections as tasks (nobody queues) and with ``--connections``, and how many
turns waited. The pool is imported from the working directory, so that two source trees
can be compared (run it in each, in turn).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

import trio

from pooled_proxy.config import ServerAddress, UpstreamConfig
from pooled_proxy.upstream.pool import UpstreamPool

SERVER = ServerAddress("127.0.0.1", 9)


class Connection:
    """What the pool asks of a connection, and nothing more."""

    def __init__(self) -> None:
        self.requests_sent = 0
        self.keepalive_expiry: float | None = None
        self.keepalive_advertised: float | None = 60.0  # not probed: no socket
        self.idle_since = 0.0
        self.idle_age = 0.0
        self.probe_at = math.inf
        self.connect_time = 0.0

    def close(self) -> None:
        pass

    def is_readable(self) -> bool:
        return False

    def is_reusable(self) -> bool:
        return True

    def prepare_reuse(self) -> None:
        pass

    def upstream_ends_connection(self) -> bool:
        return False


async def connect(server: ServerAddress) -> Connection:
    return Connection()


def on_wait() -> None:
    pass


async def turns(tasks: int, connections: int, rounds: int) -> tuple[float, float]:
    """CPU seconds per turn, and the share of turns that waited in the queue."""
    config = UpstreamConfig(
        name="bench",
        servers=(SERVER,),
        max_connections=connections,
        max_idle=connections,
        queue_size=tasks,
    )
    pool = UpstreamPool(SERVER, config, connect=connect)  # type: ignore[arg-type]

    async def one_task() -> None:
        for _ in range(rounds):
            connection = pool.take_idle()
            if connection is None:
                connection, _ = await pool.acquire(on_wait=on_wait)
            await trio.lowlevel.checkpoint()
            pool.release(connection, reusable=True)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run_reaper)
        async with trio.open_nursery() as warm:
            for _ in range(tasks):
                warm.start_soon(one_task)
        waits = pool.statistics().queue_waits
        started = time.process_time()
        async with trio.open_nursery() as timed:
            for _ in range(tasks):
                timed.start_soon(one_task)
        used = time.process_time() - started
        waited = pool.statistics().queue_waits - waits
        nursery.cancel_scope.cancel()
    return used / (tasks * rounds), waited / (tasks * rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=256)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200, help="turns per task per run")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    for label, connections in (("unqueued", args.tasks), ("queued", args.connections)):
        figures = [trio.run(turns, args.tasks, connections, args.rounds) for _ in range(args.runs)]
        cpu = statistics.median(f[0] for f in figures) * 1e6
        waited = statistics.median(f[1] for f in figures)
        print(f"{label:9} {cpu:6.2f} us per turn, {100 * waited:3.0f}% waited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
