"""Reads and writes on plain TCP streams with fewer layers than ``trio.SocketStream``.

A proxied HTTP/1.1 request makes five or six socket calls, and each one through
``SocketStream`` and trio's socket wrapper runs about fifteen Python calls (a conflict
detector, an error-translating context manager, an async context manager around the system
call). On a plain TCP stream these two functions do the same with the file descriptor
directly: one attempt, then trio's own ``wait_readable``/``wait_writable`` if the kernel says
it must wait. They keep trio's rules: a checkpoint on every call (cancellation is seen
before the call, and a call that did not block still yields to the scheduler afterwards,
which also lets the peer's answer arrive before the next read), and a closed socket raises
``trio.ClosedResourceError``. Errors from the kernel (a reset, a broken pipe) are raised as
``OSError``; the callers map those as they map trio's ``BrokenResourceError``.

Any other stream (TLS, the tests' memory streams) takes its own methods. Only one task may
send, and one receive, on a stream at a time, as with trio's streams.
"""

from __future__ import annotations

import math
import os

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

MAX_RECEIVE = 64 * 1024  # the most one socket read takes, client or upstream side
# How long a polite close of a client connection may linger: the last answer's bytes, a
# GOAWAY, a TLS close_notify to a client that may not read them.
CLOSE_TIMEOUT = 2.0


def _fd(stream: trio.SocketStream) -> int:
    fd = stream.socket.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the socket was already closed")
    return fd


async def send_all(stream: trio.abc.Stream, data: bytes, timeout: float = math.inf) -> None:
    """``stream.send_all(data)``; ``trio.TooSlowError`` if the peer does not take it all
    within ``timeout`` seconds.

    The timer (a cancel scope, which costs as much as the write itself) is only set up when
    the kernel cannot take the data at once, which on a plain TCP stream is rare.
    """
    if type(stream) is not trio.SocketStream:
        if timeout == math.inf:
            await stream.send_all(data)
            return
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            await stream.send_all(data)
            return
        raise trio.TooSlowError
    fd = _fd(stream)
    await checkpoint_if_cancelled()
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        await cancel_shielded_checkpoint()
        return
    if timeout == math.inf:
        await _write_when_writable(fd, memoryview(data), sent)
        return
    with trio.CancelScope(deadline=trio.current_time() + timeout):
        await _write_when_writable(fd, memoryview(data), sent)
        return
    raise trio.TooSlowError


async def _write_when_writable(fd: int, view: memoryview, sent: int) -> None:
    while sent < len(view):
        await wait_writable(fd)  # raises ClosedResourceError if the socket is closed meanwhile
        try:
            sent += os.write(fd, view[sent:])
        except BlockingIOError:
            pass


async def receive_some(
    stream: trio.abc.Stream,
    max_bytes: int,
    deadline: float = math.inf,
    *,
    wait_first: bool = False,
) -> bytes:
    """``stream.receive_some(max_bytes)``: ``b""`` at the end of the stream;
    ``trio.TooSlowError`` if nothing came by ``deadline`` (a timer is only set if it waits).

    ``wait_first``: the caller just found nothing to read (``receive_now``), so the call
    waits for the socket before it reads instead of trying once more at once.
    """
    if type(stream) is not trio.SocketStream:
        if deadline == math.inf:
            return bytes(await stream.receive_some(max_bytes))
        with trio.CancelScope(deadline=deadline):
            return bytes(await stream.receive_some(max_bytes))
        raise trio.TooSlowError
    if not wait_first:
        await checkpoint_if_cancelled()
        data = receive_now(stream, max_bytes)
        if data is not None:
            await cancel_shielded_checkpoint()
            return data
    fd = _fd(stream)
    if deadline == math.inf:
        return await _read_when_readable(fd, max_bytes)
    with trio.CancelScope(deadline=deadline):
        return await _read_when_readable(fd, max_bytes)
    raise trio.TooSlowError


def receive_now(stream: trio.abc.Stream, max_bytes: int) -> bytes | None:
    """What ``receive_some`` would return at once, or ``None`` if it would have to wait (or
    cannot tell: not a plain TCP stream). Not a checkpoint."""
    if type(stream) is not trio.SocketStream:
        return None
    try:
        return os.read(_fd(stream), max_bytes)
    except BlockingIOError:
        return None


async def _read_when_readable(fd: int, max_bytes: int) -> bytes:
    while True:
        await wait_readable(fd)  # raises ClosedResourceError if the socket is closed meanwhile
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
