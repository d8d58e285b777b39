"""Accepting clients on real sockets: a burst of new connections waiting in the kernel's queue
is taken in one trip through the scheduler, not one connection per trip."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import trio
import trio.lowlevel

from pooled_proxy.server import accept, group
from pooled_proxy.server.group import ConnectionCounts, WorkerGroup
from pooled_proxy.server.listen import listening_sockets
from tests.support.helpers import HOST, make_config, start_proxy

BURST = 100


async def passes_until_answered(port: int, count: int) -> int:
    """Connect ``count`` clients at once, each sending a request the proxy answers itself;
    how many passes of the scheduler until every one has its answer."""
    clients = []
    try:
        # Connected and sent without a checkpoint in between: the kernel completes every
        # handshake and holds each request while the proxy's event loop has not run.
        for _ in range(count):
            client = socket.create_connection((HOST, port))
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # no Host: the proxy answers 400 itself
            clients.append(client)
        answers: dict[socket.socket, bytes] = {}
        passes = 0
        with trio.fail_after(10):
            while len(answers) < count:
                await trio.lowlevel.checkpoint()  # one pass of the scheduler
                passes += 1
                for client in clients:
                    if client in answers:
                        continue
                    try:
                        answers[client] = client.recv(65536, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
        assert all(answer.startswith(b"HTTP/1.1 400 ") for answer in answers.values())
        return passes
    finally:
        for client in clients:
            client.close()


async def test_a_burst_of_new_clients_is_answered_within_a_few_scheduler_passes(nursery):
    """Clients that connected at once (as a load balancer or a benchmark opens its
    connections) all get their answers within a few passes of the event loop. Accepting one
    per pass left the last of them waiting for a hundred passes, each as long as serving
    every busy connection once: under load, seconds for a first answer."""
    running = await start_proxy(nursery, make_config(1))  # nothing upstream: not used
    assert await passes_until_answered(running.port, BURST) < BURST // 4


async def test_a_burst_is_accepted_at_most_accept_burst_in_a_row(nursery, monkeypatch):
    """The accepts of one pass are bounded, so a flood of new connections cannot hold up the
    clients already being served for as long as it lasts."""
    monkeypatch.setattr(accept, "ACCEPT_BURST", 10)
    running = await start_proxy(nursery, make_config(1))
    assert await passes_until_answered(running.port, BURST) >= BURST // 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd_create")
async def test_a_burst_into_the_least_busy_worker_of_a_group_is_answered_within_a_few_passes(
    nursery, monkeypatch
):
    """The same in a worker of a group (the shared socket, the shared counts), while its
    sibling holds more connections than the whole burst: this worker takes the burst in a
    row, not one per pass."""
    (shared,) = listening_sockets(
        socket.getaddrinfo(HOST, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    )
    port = shared.getsockname()[1]
    fd = ConnectionCounts.create(2)
    try:
        sibling = ConnectionCounts(fd, 1)
        for _ in range(2 * BURST):
            sibling.opened()
        this = WorkerGroup(ConnectionCounts(fd, 0), {(HOST, 0): shared})
        monkeypatch.setattr(group, "current", this)
        running = await start_proxy(nursery, make_config(1, server={"workers": 2}))
        assert running.port == port
        assert await passes_until_answered(port, BURST) < BURST // 4
    finally:
        os.close(fd)
