"""Listeners: bind every configured address and hand each client to the right front end.

On cleartext, the first bytes decide: the HTTP/2 connection preface means h2c (prior
knowledge), anything else is HTTP/1.1.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from ..answers import error_response
from ..config import ServerAddress
from ..errors import TooManyConnections
from ..protocol.http1 import raw_response
from ..proxy import PENDING, Proxy
from . import group as worker_groups
from .accept import accept_burst, accept_waiting, listening_socket
from .group import ConnectionCounts, WorkerGroup, accept_balanced
from .http1 import HTTP1Connection

LOG = logging.getLogger("pooled_proxy.listen")

# One answer of getaddrinfo: family, type, proto, canonname, sockaddr.
AddressInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSE_TIMEOUT = 1.0  # how long a connection over max_connections may take to be told so

# Set by the HTTP/2 front end module when it is available; kept as a hook so this module
# does not import h2 machinery it does not own.
H2Handler = Callable[[trio.abc.Stream, Proxy, bytes, bytes, bytes], Awaitable[None]]


def _client_ip(stream: trio.abc.Stream) -> bytes:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]).encode() if sock is not None else b"unknown"
    except OSError:
        return b"unknown"


async def sniff_preface(stream: trio.abc.Stream, deadline: float) -> bytes:
    """Read until the bytes so far either diverge from the h2 preface or complete it (or
    ``deadline`` passes)."""
    data = b""
    with trio.move_on_at(deadline):
        while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
            chunk = await stream.receive_some(64 * 1024)
            if not chunk:
                break
            data += chunk
    return data


async def handle_client(
    stream: trio.abc.Stream,
    proxy: Proxy,
    *,
    scheme: bytes,
    h2_handler: H2Handler | None,
    alpn: str | None = None,
    head_deadline: float | None = None,
) -> None:
    """Serve one client; ``alpn`` is the TLS-negotiated protocol, which wins over sniffing.

    The first request head must be complete by ``head_deadline`` (default: one
    ``header_timeout`` from now), the wait for its first bytes included.
    """
    if head_deadline is None:
        head_deadline = trio.current_time() + proxy.server.header_timeout
    client_ip = _client_ip(stream)
    proxy.client_connections += 1
    try:
        if proxy.client_connections > proxy.server.max_connections:
            await refuse_over_limit(stream, proxy.server.max_connections)
            return
        if alpn == "h2" and h2_handler is not None:
            await h2_handler(stream, proxy, client_ip, scheme, b"")
            return
        proxy.connections_by_protocol[PENDING] += 1
        try:
            # While draining, a new connection that sends nothing is idle: it is cut after a
            # short grace (its request may already be on the way).
            with proxy.waiting_for_first_request() as first_request:
                initial = await sniff_preface(stream, head_deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        finally:
            proxy.connections_by_protocol[PENDING] -= 1
        if first_request.cancelled_caught:
            await trio.aclose_forcefully(stream)
            return
        if initial.startswith(H2_PREFACE) and h2_handler is not None:
            await h2_handler(stream, proxy, client_ip, scheme, initial)
            return
        connection = HTTP1Connection(
            stream,
            proxy,
            client_ip=client_ip,
            scheme=scheme,
            initial_data=initial,
            head_deadline=head_deadline,
        )
        await connection.serve()
    except Exception:
        # One bad connection must never take the others down with it.
        LOG.exception("connection from %s failed", client_ip.decode())
        await trio.aclose_forcefully(stream)
    finally:
        proxy.client_connections -= 1


async def refuse_over_limit(stream: trio.abc.Stream, limit: int) -> None:
    """Over ``server.max_connections``: a short 503 with ``Connection: close``, then close.

    Accepted and answered rather than left in the kernel's backlog, so the client learns at
    once. The close is polite: half-close, then read what the client sends until it closes
    too (bounded by REFUSE_TIMEOUT), so its unread request does not turn our close into a
    reset that destroys the 503 before the client reads it.
    """
    status, headers, body = error_response(
        TooManyConnections(f"over server.max_connections ({limit})")
    )
    headers.append((b"connection", b"close"))
    with trio.move_on_after(REFUSE_TIMEOUT):
        try:
            await stream.send_all(raw_response(status, headers, body))
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            while await stream.receive_some(64 * 1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def listening_sockets(infos: Iterable[AddressInfo]) -> list[socket.socket]:
    """A listening socket for each of ``infos`` (what ``getaddrinfo`` answered; a family this
    system lacks is skipped, as for "*" without IPv6): the supervisor's, which every worker
    of its group inherits and accepts from (group.py)."""
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue
                raise
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(0xFFFF)  # the kernel caps it at net.core.somaxconn
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def open_listeners(
    addresses: tuple[ServerAddress, ...], *, group: WorkerGroup | None = None
) -> list[trio.SocketListener]:
    """Listen on ``addresses``; in a worker of a group, on the supervisor's sockets."""
    listeners: list[trio.SocketListener] = []
    for address in addresses:
        inherited = group.take(address) if group is not None else None
        if inherited is not None:
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(inherited)))
            continue
        try:
            # host None (from "*"): every family the system has, as trio does it
            listeners += await trio.open_tcp_listeners(address.port, host=address.host or None)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return listeners


# The most connections taken from one listener's accept queue when the drain starts (the
# kernel caps the queue at net.core.somaxconn, 4096 by default).
BACKLOG_SWEEP_LIMIT = 4096


def close_after_backlog(listener: trio.SocketListener) -> list[trio.SocketStream]:
    """Close ``listener``, first accepting the connections waiting in its queue.

    All in one synchronous pass: accepting one connection per trip through the scheduler
    takes long enough under load for new clients to keep the queue from ever emptying (the
    listener stayed open for as long as the load went on), and the close follows the last
    accept at once, so hardly any client completes its handshake in between only to be
    reset.
    """
    taken: list[trio.SocketStream] = []
    with listening_socket(listener) as sock:
        try:
            accept_waiting(sock, BACKLOG_SWEEP_LIMIT, taken.append)
        except OSError:  # no file descriptor is left: the rest are reset with the close
            pass
        listener.socket.close()
    return taken


async def accept_until_drain(
    listeners: list[trio.SocketListener],
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    handler_nursery: trio.Nursery,
    drain_started: trio.Event,
    group: WorkerGroup | None = None,
) -> None:
    """Accept until ``drain_started``, then close the listeners: new connections are refused.

    ``group``: the listeners are a worker group's, shared; accept as group.py balances.

    Before closing, the connections the kernel had completed when the drain started are
    accepted and served: their clients saw ``connect()`` succeed, and closing a listener
    would reset them. Only those: under load, new ones keep arriving behind them.
    """

    counts = group.counts if group is not None else None

    async def run_handler(stream: trio.abc.Stream) -> None:
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def run_counted(stream: trio.abc.Stream, counts: ConnectionCounts) -> None:
        try:
            await run_handler(stream)
        finally:
            counts.closed()

    def start_uncounted(stream: trio.abc.Stream) -> None:
        handler_nursery.start_soon(run_handler, stream)

    def start_counted(stream: trio.abc.Stream, counts: ConnectionCounts) -> None:
        # The count is raised as the connection is accepted (accept_balanced, the sweep):
        # the next connection may already be waiting, and the siblings look at it.
        handler_nursery.start_soon(run_counted, stream, counts)

    async def accept_forever(listener: trio.SocketListener) -> None:
        with listening_socket(listener) as sock:
            if counts is not None:
                start = functools.partial(start_counted, counts=counts)
                while True:
                    await accept_balanced(sock, counts, start)
            while True:
                await trio.lowlevel.wait_readable(sock)
                await accept_burst(sock, start_uncounted)

    try:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(accept_forever, listener)
            await drain_started.wait()
            accepting.cancel_scope.cancel()
        names = ", ".join(str(bound_address(listener)) for listener in listeners)
        swept = 0
        for listener in listeners:
            for stream in close_after_backlog(listener):
                if counts is not None:
                    counts.opened()
                    start_counted(stream, counts)
                else:
                    start_uncounted(stream)
                swept += 1
        LOG.info("stopped listening on %s: %d waiting connection(s) accepted first", names, swept)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


def worker_group(proxy: Proxy) -> WorkerGroup | None:
    """This process's group, when it is a worker of one."""
    return worker_groups.current if proxy.server.workers > 1 else None


def bound_address(listener: trio.SocketListener) -> ServerAddress:
    host, port = listener.socket.getsockname()[:2]
    return ServerAddress(host, port)


async def serve_listeners(
    proxy: Proxy,
    handler_nursery: trio.Nursery,
    *,
    h2_handler: H2Handler | None = None,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every configured address until the drain starts (or cancelled); connections
    run in ``handler_nursery``."""
    group = worker_group(proxy)
    listeners = await open_listeners(proxy.server.listen, group=group)

    async def handler(stream: trio.abc.Stream) -> None:
        await handle_client(stream, proxy, scheme=b"http", h2_handler=h2_handler)

    addresses = [bound_address(listener) for listener in listeners]
    task_status.started(addresses)
    await accept_until_drain(listeners, handler, handler_nursery, proxy.drain_started, group)
