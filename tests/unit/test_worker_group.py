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
) -> AsyncIterator[tuple[int, list[ConnectionCounts], list[socket.socket]]]:
    """A listening port, and for each worker its counts and its non-blocking descriptor of
    the socket (as the listeners accept from)."""
    (sock,) = listening_sockets(
        socket.getaddrinfo("127.0.0.1", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )
    fd = ConnectionCounts.create(workers)
    try:
        counts = [ConnectionCounts(fd, index) for index in range(workers)]
        listeners = [socket.socket(fileno=os.dup(sock.fileno())) for _ in range(workers)]
        for listener in listeners:
            listener.setblocking(False)
        try:
            yield sock.getsockname()[1], counts, listeners
        finally:
            for listener in listeners:
                listener.close()
    finally:
        sock.close()
        os.close(fd)


async def test_a_busier_worker_leaves_new_connections_to_the_least_busy(autojump_clock):
    async with group_of(2) as (port, counts, listeners):
        counts[0].opened()  # worker 0 already serves a connection
        order: list[int] = []
        clients: list[trio.SocketStream] = []

        async def worker(index: int) -> None:
            def start(stream: trio.SocketStream) -> None:
                clients.append(stream)
                order.append(index)

            while True:
                await accept_balanced(listeners[index], counts[index], start)

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
            await accept_balanced(listeners[0], counts[0], clients.append)
            waits.append(trio.current_time() - started)
            if len(waits) == 2:
                await trio.sleep(UNBALANCED_SECONDS)
        for client in clients:
            await client.aclose()
    # Left for the sibling, then taken; the next at once; after a while, left again.
    assert waits == pytest.approx([DEFER_SECONDS, 0, DEFER_SECONDS], abs=0.002)


async def test_a_worker_takes_a_burst_in_a_row_until_it_would_be_the_busier(autojump_clock):
    """Connections waiting at once are taken in a row, each counted as it is taken (as the
    sibling sees it), until this worker holds more than the least busy one allows."""
    async with group_of(2) as (port, counts, listeners):
        for _ in range(40):
            counts[1].opened()  # the sibling serves 40
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        taken: list[trio.SocketStream] = []
        seen_counts: list[int] = []

        def start(stream: trio.SocketStream) -> None:
            taken.append(stream)
            seen_counts.append(counts[0].mine)

        try:
            await accept_balanced(listeners[0], counts[0], start)
            # One more than the sibling's 40 and its tolerance of an eighth: then busier.
            assert len(taken) == 40 + 40 // 8 + 1
            assert seen_counts == list(range(1, len(taken) + 1))
            # The rest is left in the queue for the sibling.
            await accept_balanced(listeners[1], counts[1], taken.append)
            assert len(taken) == 50 and counts[1].mine == 44
        finally:
            close_all(clients, taken)


async def test_a_burst_into_a_group_is_split_evenly(autojump_clock):
    """Both workers taking bursts from the same queue end up with even shares."""
    async with group_of(2) as (port, counts, listeners):
        taken: list[trio.SocketStream] = []
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        try:
            async with trio.open_nursery() as nursery:
                for index in (0, 1):
                    nursery.start_soon(accept_forever, listeners[index], counts[index], taken)
                while len(taken) < len(clients):
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
            assert [c.mine for c in counts] == [16, 16]
        finally:
            close_all(clients, taken)


async def accept_forever(
    sock: socket.socket, counts: ConnectionCounts, taken: list[trio.SocketStream]
) -> None:
    while True:
        await accept_balanced(sock, counts, taken.append)


def close_all(clients: list[socket.socket], taken: list[trio.SocketStream]) -> None:
    for client in clients:
        client.close()
    for stream in taken:
        stream.socket.close()
