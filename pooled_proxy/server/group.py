"""A worker process's share of its group (``server.workers > 1``): the listening sockets it
inherited from the supervisor and the group's client connection counts.

Every worker accepts from the same listening socket, and each keeps its count of open client
connections in a slot of memory they all map. A worker woken by a new connection while it
holds more than the least busy worker leaves it a moment to take the connection first, and
takes it itself if nobody did. So a few long-lived connections (an HTTP/2 client, a load
balancer in front) split evenly, where SO_REUSEPORT's hash of the address pair would often
give one worker twice the other's share; many connections spread evenly either way.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..config import ServerAddress
from .accept import accept_burst

# The longest a worker busier than a sibling leaves a new connection for it. The sibling is
# woken by the same connection and takes it at its next trip through its event loop, which
# is much sooner unless it is stalled; on a loaded machine, a runnable process can wait tens
# of milliseconds for a CPU, and a hash (SO_REUSEPORT) would have left the connection in its
# queue for as long. This bounds the wait when the sibling does not take it at all.
DEFER_SECONDS = 0.5
DEFER_POLL_SECONDS = 0.001
# A connection left for a sibling that was still there afterwards: the siblings are not
# accepting (stopped, or stuck in a long computation), so take new connections at once for
# this long.
UNBALANCED_SECONDS = 1.0
SLOT_BYTES = 8


class ConnectionCounts:
    """The group's open client connections, one slot per worker, in memory shared through
    ``fd`` (a memfd the supervisor made); this worker writes slot ``index`` only."""

    def __init__(self, fd: int, index: int) -> None:
        self._map = mmap.mmap(fd, 0)
        self._slots = memoryview(self._map).cast("q")
        self._index = index
        self.mine = 0
        self._slots[index] = 0  # a restarted worker starts afresh
        self.balance_from = 0.0  # trio time before which accept_balanced does not defer

    @staticmethod
    def create(workers: int) -> int:
        """A new zeroed memory of ``workers`` slots, as a file descriptor to hand down."""
        fd = os.memfd_create("pooled-proxy-connections", 0)
        os.ftruncate(fd, workers * SLOT_BYTES)
        return fd

    def opened(self) -> None:
        self.mine += 1
        self._slots[self._index] = self.mine

    def closed(self) -> None:
        self.mine -= 1
        self._slots[self._index] = self.mine

    def should_defer(self) -> bool:
        """More than the least busy worker (with a tolerance of an eighth once there are
        many, where a connection more or less does not matter)."""
        least = min(self._slots)
        return self.mine > least + least // 8

    def leave_to_siblings(self) -> bool:
        """Busier than the least busy worker, and not in a while of taking connections at
        once after the siblings let one wait (``balance_from``)."""
        return trio.current_time() >= self.balance_from and self.should_defer()


@dataclass
class WorkerGroup:
    """What a worker of a group listens with: the supervisor's listening sockets by
    address, and the group's connection counts."""

    counts: ConnectionCounts
    sockets: dict[tuple[str, int], socket.socket] = field(default_factory=dict)

    def take(self, address: ServerAddress) -> socket.socket | None:
        return self.sockets.pop((address.host, address.port), None)


# Set once in a worker process before it serves (daemon/worker.py); None elsewhere.
current: WorkerGroup | None = None


async def accept_balanced(
    sock: socket.socket, counts: ConnectionCounts, start: Callable[[trio.SocketStream], object]
) -> None:
    """Wait for connections on the group's shared listening ``sock`` (non-blocking), and
    take those waiting in a row, raising this worker's count as each is taken (so the
    siblings see it) and handing it to ``start``, while this worker is not busier than the
    least busy one. Woken busier, leave the first a moment for a less busy worker."""

    taken = 0

    def take(stream: trio.SocketStream) -> None:
        nonlocal taken
        counts.opened()
        taken += 1
        start(stream)

    def more() -> bool:
        return not counts.leave_to_siblings()

    while True:
        await trio.lowlevel.wait_readable(sock)
        balance_from = counts.balance_from
        if counts.leave_to_siblings():
            # Until a sibling took it or this worker is no longer the busier one; looking
            # often, so that it does not miss the connections that arrive meanwhile.
            give_up_at = trio.current_time() + DEFER_SECONDS
            while counts.should_defer() and trio.current_time() < give_up_at and _waiting(sock):
                await trio.sleep(DEFER_POLL_SECONDS)
            if counts.should_defer() and _waiting(sock):
                # Still busier, with a connection waiting: the siblings are not keeping up.
                counts.balance_from = trio.current_time() + UNBALANCED_SECONDS
        # The first in a row even when busier (after the wait above); the sibling woken by
        # the same connections may have taken them all meanwhile.
        await accept_burst(sock, take, more)
        if taken:
            return
        counts.balance_from = balance_from


def _waiting(sock: socket.socket) -> bool:
    """A connection is waiting to be accepted."""
    return bool(select.select([sock], [], [], 0)[0])
