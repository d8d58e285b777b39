"""Taking connections from a listening socket's queue: many in one trip through the
scheduler, skipping those that died in the queue, backing off when out of descriptors.

Both ways of listening use it: a single process's own listener (listen.py) and a worker's
share of its group's listener (group.py), which stops taking earlier to balance the group.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

import trio

LOG = logging.getLogger("pooled_proxy.listen")

# The most connections accepted in a row, in one trip through the scheduler. One per trip
# (what ``trio.SocketListener.accept`` does) leaves a burst of new clients (a load balancer
# or a benchmark opening its connections at once) in the kernel's queue for as many trips,
# and under load each trip serves every busy connection once first: the last of the burst
# waited seconds for its first answer. An accept and a task to start are cheap next to the
# requests those connections bring; the bound keeps a flood from holding up everything else.
ACCEPT_BURST = 256
# Out of file descriptors or memory: retried after a pause rather than failing the listener.
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_RETRY_SECONDS = 0.1
# What accept(2) may report for one connection that died in the queue (as trio's listener
# skips them): the next one is still there.
_ACCEPT_SKIPPED_ERRNOS = {
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPERM",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
}


def listening_socket(listener: trio.SocketListener) -> socket.socket:
    """A non-blocking stdlib socket on the listener's queue, to accept without a checkpoint
    per connection; closing it leaves the listener open."""
    sock = socket.socket(fileno=os.dup(listener.socket.fileno()))
    sock.setblocking(False)
    return sock


def accept_waiting(
    sock: socket.socket,
    limit: int,
    take: Callable[[trio.SocketStream], object],
    more: Callable[[], bool] | None = None,
) -> None:
    """Hand ``take`` each of up to ``limit`` connections waiting in ``sock``'s queue
    (non-blocking), without a trip through the scheduler; stop when the queue is empty, or
    when ``more`` (asked after each one taken) says so.

    A capacity error (no file descriptor left) is raised, after what was accepted before it.
    """
    for _ in range(limit):
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _ACCEPT_SKIPPED_ERRNOS:
                continue
            raise
        take(trio.SocketStream(trio.socket.from_stdlib_socket(connection)))
        if more is not None and not more():
            return


async def accept_burst(
    sock: socket.socket,
    take: Callable[[trio.SocketStream], object],
    more: Callable[[], bool] | None = None,
) -> None:
    """``accept_waiting`` up to ACCEPT_BURST; out of descriptors, say so and pause."""
    try:
        accept_waiting(sock, ACCEPT_BURST, take, more)
    except OSError as exc:
        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
            raise
        LOG.error(
            "accept failed (%s); retrying in %gs", errno.errorcode[exc.errno], ACCEPT_RETRY_SECONDS
        )
        await trio.sleep(ACCEPT_RETRY_SECONDS)
