"""One HTTP/1.1 front-end connection over in-memory streams on trio's MockClock, in front of an
in-memory upstream, and what came of it."""

from __future__ import annotations

import re
from dataclasses import dataclass

import trio
import trio.testing

from pooled_proxy.proxy import Proxy
from pooled_proxy.server.http1 import HTTP1Connection
from tests.support.faulty_upstream import FaultyUpstream, SeenRequest, read_until_close
from tests.support.helpers import make_config

SERVER = {
    "header_timeout": 10.0,
    "keepalive_timeout": 20.0,
    "body_timeout": 15.0,
    "write_timeout": 10.0,
    "max_header_bytes": 2048,
    "max_header_count": 20,
    "max_body_bytes": 4096,
}


# The proxy must have closed the client connection by then, whatever the bytes were.
CLOSE_WITHIN = 200.0


_DATE = re.compile(rb"(?i)\r\ndate: [^\r]*")


@dataclass
class Outcome:
    reply: bytes
    upstream_requests: int
    in_use: int
    idle: int
    upstream_open: int
    upstream_seen: list[SeenRequest]


_NEW_ID = re.compile(rb"(?<=\r\nx-request-id: )[0-9a-f]{24}(?=\r\n)", re.IGNORECASE)


def _without_new_ids(reply: bytes) -> bytes:
    """The reply with the request IDs the proxy made masked: they differ between runs."""
    return _NEW_ID.sub(b"-", reply)


def _seen_without_new_id(request: SeenRequest) -> SeenRequest:
    headers = [
        (name, b"-" if name == b"x-request-id" and re.fullmatch(rb"[0-9a-f]{24}", value) else value)
        for name, value in request.headers
    ]
    return SeenRequest(request.method, request.target, headers, request.body, request.complete)


def exchange(data: bytes, cuts: list[int], half_close: bool) -> Outcome:
    """Run one connection on a fresh trio loop and MockClock; return what happened."""

    async def main() -> Outcome:
        upstream = FaultyUpstream(mode="ok")
        async with trio.open_nursery() as nursery:
            proxy = Proxy(
                make_config(1, response_header_timeout=5.0, read_timeout=5.0, server=SERVER),
                connect=upstream.connector(nursery),
            )
            client, server = trio.testing.memory_stream_pair()
            connection = HTTP1Connection(server, proxy, client_ip=b"203.0.113.7", scheme=b"http")
            served = trio.Event()

            async def serve() -> None:
                await connection.serve()  # anything it raises fails the example
                served.set()

            nursery.start_soon(serve)
            with trio.fail_after(CLOSE_WITHIN):
                try:
                    for start, end in zip([0, *cuts], [*cuts, len(data)]):
                        await client.send_all(data[start:end])
                        await trio.testing.wait_all_tasks_blocked()
                    if half_close:
                        await client.send_eof()
                except trio.BrokenResourceError:
                    pass  # the proxy closed on us mid-send: fine
                reply = await read_until_close(client)
                await served.wait()
            await client.aclose()
            await trio.testing.wait_all_tasks_blocked()
            stats = proxy.forwarder.upstreams["app"].pools[0].statistics()
            outcome = Outcome(
                # The Date the proxy adds says when, which two runs need not agree on.
                _without_new_ids(_DATE.sub(b"\r\ndate: (now)", reply)),
                len(upstream.requests),
                stats.in_use,
                stats.idle,
                upstream.connections_open,
                [_seen_without_new_id(request) for request in upstream.requests],
            )
            proxy.forwarder.close()
            nursery.cancel_scope.cancel()
        return outcome

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
