"""POSTs against an upstream that closes idle connections without announcing it.

The keep-alive race for requests that cannot be replayed: an upstream closes connections
left idle ``--idle`` seconds (no ``Keep-Alive: timeout=N``, as uvicorn, gunicorn and many
others), and clients send POSTs with a body after gaps of about that long, so the proxy
reuses pooled connections right at the moment the upstream closes them. Counts the 502s,
and what avoiding them costs in upstream connects.

    python bench/idle_close.py                 # the pool learns the timeout (the default)
    python bench/idle_close.py --baseline      # learning switched off, for comparison
    python bench/idle_close.py --idle 300      # a long timeout: connections are kept

Loopback only; upstream, proxy and clients run in this one process. Bounded: ``--lanes``
clients each send ``--requests`` POSTs (about ``--requests`` x ``--idle`` seconds).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import h11
import trio

from pooled_proxy.config import Config, RouteConfig, ServerAddress, ServerConfig, UpstreamConfig
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.proxy import Proxy
from pooled_proxy.upstream.idle_close import IdleCloseLearner

HOST = "127.0.0.1"


class IdleClosingUpstream:
    """Answers 200 to every request; closes a connection idle ``idle`` seconds, unannounced.

    Its event loop is busy: it reads a request ``lag`` seconds after it arrived, and when its
    idle timer fires first it closes the connection with the request unread (a reset), as a
    loaded uvicorn or Node does. That is the race: a request sent within ``lag`` of the
    close is lost, though the connection was open when it was sent.
    """

    def __init__(self, idle: float, lag: float) -> None:
        self.idle = idle
        self.lag = lag
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    idle = conn.our_state is h11.IDLE and conn.their_state is h11.IDLE
                    with trio.move_on_after(self.idle if idle else 10.0):
                        await trio.lowlevel.wait_readable(stream.socket)
                        await trio.sleep(self.lag)  # busy elsewhere; the timer may fire
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    return  # idle too long: close without a word (unread bytes: a reset)
                if isinstance(event, h11.EndOfMessage):
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                        + conn.send(h11.Data(data=b"ok"))
                        + conn.send(h11.EndOfMessage())
                    )
                    conn.start_next_cycle()


async def post(port: int) -> int:
    body = b"x" * 100
    async with await trio.open_tcp_stream(HOST, port) as stream:
        await stream.send_all(
            b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        reply = b""
        while data := await stream.receive_some(65536):
            reply += data
    return int(reply.split(b" ", 2)[1])


def switch_learning_off() -> None:
    """The pool as it was before it learned: no close is evidence, any idle age will do."""
    IdleCloseLearner.record_close = lambda self, age, now: False  # type: ignore[method-assign]
    IdleCloseLearner.unreplayable_limit = lambda self, now: float("inf")  # type: ignore[method-assign]


async def run(args: argparse.Namespace) -> None:
    upstream = IdleClosingUpstream(args.idle, args.lag)
    statuses: Counter[int] = Counter()
    rng = random.Random(args.seed)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(upstream.serve)
        config = Config(
            server=ServerConfig(listen=(ServerAddress(HOST, 0),)),
            upstreams={"app": UpstreamConfig(name="app", servers=(ServerAddress(HOST, port),))},
            routes=(RouteConfig(upstream="app"),),
        )
        proxy = Proxy(config)
        addresses = await nursery.start(serve, proxy)
        proxy_port = addresses[0].port
        gap = args.idle if args.idle <= 5 else 1.0

        async def lane() -> None:
            for _ in range(args.requests):
                statuses[await post(proxy_port)] += 1
                await trio.sleep(rng.uniform(gap * (1 - args.spread), gap * (1 + args.spread)))

        started = trio.current_time()
        async with trio.open_nursery() as lanes:
            for _ in range(args.lanes):
                lanes.start_soon(lane)
                await trio.sleep(gap / args.lanes)  # spread the lanes over one gap
        elapsed = trio.current_time() - started
        pool = proxy.forwarder.upstreams["app"].pools[0]
        stats = pool.statistics()
        total = sum(statuses.values())
        print(
            f"idle close {args.idle:g} s (lag {args.lag:g} s), "
            f"{'baseline (no learning)' if args.baseline else 'learning'}: "
            f"{total} POSTs in {elapsed:.0f} s, statuses {dict(sorted(statuses.items()))}, "
            f"502s {statuses[502]}"
        )
        print(
            f"upstream connects {stats.opened} ({stats.opened / total:.2f} per request), "
            f"reused {stats.reused}, closed {dict(sorted(stats.closed.items()))}, "
            f"learned timeout {pool.learned_idle_timeout}"
        )
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=1.0, help="upstream idle close (s)")
    parser.add_argument("--lag", type=float, default=0.02, help="upstream's busy-loop delay (s)")
    parser.add_argument("--lanes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=90, help="POSTs per lane")
    parser.add_argument("--spread", type=float, default=0.1, help="gap = idle x (1 +- spread)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", action="store_true", help="switch the learning off")
    args = parser.parse_args()
    if args.baseline:
        switch_learning_off()
    trio.run(run, args)


if __name__ == "__main__":
    main()
