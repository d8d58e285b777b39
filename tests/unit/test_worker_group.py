"""A worker group's shared accept (server/group.py): real sockets on 127.0.0.1, the workers
as two tasks accepting from one listening socket (each through its own descriptor, as
processes do), their connection counts in one shared memory, on trio's MockClock."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from pooled_proxy.server.group import (
    DEFER_SECONDS,
    UNBALANCED_SECONDS,
    ConnectionCounts,
    accept_balanced,
)
from pooled_proxy.server.listen import listening_sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd_create")


@asynccontextmanager
async def group_of(
    workers: int,
) -> AsyncIterator[tuple[int, list[ConnectionCounts], list[trio.SocketListener]]]:
    """A listening port, and for each worker its counts and its descriptor of the socket."""
    (sock,) = listening_sockets(
        socket.getaddrinfo("127.0.0.1", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )
    fd = ConnectionCounts.create(workers)
    try:
        counts = [ConnectionCounts(fd, index) for index in range(workers)]
        listeners = [
            trio.SocketListener(
                trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(sock.fileno())))
            )
            for _ in range(workers)
        ]
        yield sock.getsockname()[1], counts, listeners
        for listener in listeners:
            await listener.aclose()
    finally:
        sock.close()
        os.close(fd)


async def test_a_busier_worker_leaves_new_connections_to_the_least_busy(autojump_clock):
    async with group_of(2) as (port, counts, listeners):
        counts[0].opened()  # worker 0 already serves a connection
        order: list[int] = []
        clients: list[trio.SocketStream] = []

        async def worker(index: int) -> None:
            while True:
                clients.append(await accept_balanced(listeners[index], counts[index]))
                counts[index].opened()
                order.append(index)

        async with trio.open_nursery() as nursery:
            for index in (0, 1):
                nursery.start_soon(worker, index)
            for expected in range(1, 16):
                clients.append(await trio.open_tcp_stream("127.0.0.1", port))
                while len(order) < expected:
                    await trio.sleep(0.001)
                mine = [c.mine for c in counts]
                assert max(mine) - min(mine) <= 1, order
            nursery.cancel_scope.cancel()
        for client in clients:
            await client.aclose()
    # The first went to the idle worker; then each took its turn.
    assert order[0] == 1
    assert [c.mine for c in counts] == [8, 8]


async def test_a_worker_whose_sibling_does_not_accept_waits_once_then_takes_connections(
    autojump_clock,
):
    async with group_of(2) as (port, counts, listeners):
        counts[0].opened()  # worker 1 has fewer connections, but it never accepts
        waits: list[float] = []
        clients: list[trio.SocketStream] = []
        for _ in range(3):
            clients.append(await trio.open_tcp_stream("127.0.0.1", port))
            started = trio.current_time()
            clients.append(await accept_balanced(listeners[0], counts[0]))
            waits.append(trio.current_time() - started)
            counts[0].opened()
            if len(waits) == 2:
                await trio.sleep(UNBALANCED_SECONDS)
        for client in clients:
            await client.aclose()
    # Left for the sibling, then taken; the next at once; after a while, left again.
    assert waits == pytest.approx([DEFER_SECONDS, 0, DEFER_SECONDS], abs=0.002)
