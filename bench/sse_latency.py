"""What the proxy adds to Server-Sent Events latency, measured against a direct connection.

    .venv/bin/python bench/sse_latency.py [--streams 10] [--events 100] [--interval 0.02]

The demo upstream (its own process) stamps every event with the wall-clock time it wrote it;
the client notes when each whole event arrived. The same number of streams runs at the same
time directly to the upstream, through the proxy (its own process) over HTTP/1.1, and
through the proxy over h2c, so all three see the same machine load. The table gives p50/p99
of the per-event latency (upstream write -> client has the event) and of the time to the
first event (request sent -> first event), and what the proxy adds to each percentile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h11
import trio
from _servers import HOST, cpu_count_note, demo_upstream, proxy

ROWS = ("direct h1", "proxy h1", "proxy h2c")


@dataclass
class Timings:
    latencies: list[float] = field(default_factory=list)
    first_event: list[float] = field(default_factory=list)


class _Events:
    """Splits a byte stream into the demo's events and times each one."""

    def __init__(self, timings: Timings, requested: float) -> None:
        self.timings = timings
        self.requested = requested
        self.buffer = b""
        self.count = 0

    def feed(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    sent = json.loads(line[6:])["t"]
                    self.timings.latencies.append(now - sent)
                    if not self.count:
                        self.timings.first_event.append(now - self.requested)
                    self.count += 1


async def stream_h1(port: int, target: str, timings: Timings) -> None:
    conn = h11.Connection(h11.CLIENT)
    async with await trio.open_tcp_stream(HOST, port) as stream:
        request = h11.Request(
            method="GET",
            target=target,
            headers=[("host", "bench"), ("accept", "text/event-stream")],
        )
        events = _Events(timings, time.time())
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                events.feed(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event


async def stream_h2(port: int, target: str, timings: Timings) -> None:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    async with await trio.open_tcp_stream(HOST, port) as stream:
        headers = [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"bench"),
            (b":path", target.encode()),
        ]
        events = _Events(timings, time.time())
        conn.send_headers(1, headers, end_stream=True)
        await stream.send_all(conn.data_to_send())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("proxy closed the h2 connection")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    events.feed(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    return
                elif isinstance(event, h2.events.StreamReset):
                    raise RuntimeError(f"stream reset: {event.error_code}")
            outgoing = conn.data_to_send()
            if outgoing:
                await stream.send_all(outgoing)


async def run_round(
    upstream_port: int, proxy_port: int, streams: int, target: str
) -> dict[str, Timings]:
    results = {row: Timings() for row in ROWS}
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(stream_h1, upstream_port, target, results["direct h1"])
            nursery.start_soon(stream_h1, proxy_port, target, results["proxy h1"])
            nursery.start_soon(stream_h2, proxy_port, target, results["proxy h2c"])
    return results


async def measure(
    upstream_port: int, proxy_port: int, args: argparse.Namespace
) -> dict[str, Timings]:
    # Warm-up: the same burst of one-event streams, so the proxy's upstream pool holds as
    # many idle connections as the measured round needs (a steady state, not a cold start).
    await run_round(upstream_port, proxy_port, args.streams, "/events?count=1")
    target = f"/events?interval={args.interval}&count={args.events}"
    return await run_round(upstream_port, proxy_port, args.streams, target)


def percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0] * 1000, values[0] * 1000
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=10, help="concurrent streams per row")
    parser.add_argument("--events", type=int, default=100, help="events per stream")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between events")
    args = parser.parse_args()

    with demo_upstream() as upstream_port, proxy(upstream_port) as proxy_process:
        results = trio.run(measure, upstream_port, proxy_process.port, args)

    print(
        f"SSE: {args.streams} streams per row at once, {args.events} events each, "
        f"{args.interval * 1000:g} ms apart, warm upstream pool ({cpu_count_note()})"
    )
    header = f"{'path':<11} {'events':>7}  {'first event p50/p99 ms':>23}  {'per-event p50/p99 ms':>21}  {'added by proxy p50/p99 ms':>26}"
    print(header)
    print("-" * len(header))
    base = percentiles(results["direct h1"].latencies)
    for row in ROWS:
        timings = results[row]
        first = percentiles(timings.first_event)
        each = percentiles(timings.latencies)
        added = (
            "-" if row == "direct h1" else f"{each[0] - base[0]:+.2f} / {each[1] - base[1]:+.2f}"
        )
        print(
            f"{row:<11} {len(timings.latencies):>7}  {first[0]:>10.2f} / {first[1]:<10.2f}  "
            f"{each[0]:>9.2f} / {each[1]:<9.2f}  {added:>26}"
        )


if __name__ == "__main__":
    main()
