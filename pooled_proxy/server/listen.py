"""Listeners: bind every configured address and hand each client to the right front end.

On cleartext, the first bytes decide: the HTTP/2 connection preface means h2c (prior
knowledge), anything else is HTTP/1.1.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..config import ServerAddress
from ..proxy import Proxy
from .http1 import HTTP1Connection

LOG = logging.getLogger("pooled_proxy.listen")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

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


async def sniff_preface(stream: trio.abc.Stream, timeout: float) -> bytes:
    """Read until the bytes so far either diverge from the h2 preface or complete it."""
    data = b""
    with trio.move_on_after(timeout):
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
) -> None:
    """Serve one client; ``alpn`` is the TLS-negotiated protocol, which wins over sniffing."""
    client_ip = _client_ip(stream)
    proxy.client_connections += 1
    try:
        if alpn == "h2" and h2_handler is not None:
            await h2_handler(stream, proxy, client_ip, scheme, b"")
            return
        try:
            initial = await sniff_preface(stream, proxy.server.header_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(stream)
            return
        if initial.startswith(H2_PREFACE) and h2_handler is not None:
            await h2_handler(stream, proxy, client_ip, scheme, initial)
            return
        connection = HTTP1Connection(
            stream, proxy, client_ip=client_ip, scheme=scheme, initial_data=initial
        )
        await connection.serve()
    except Exception:
        # One bad connection must never take the others down with it.
        LOG.exception("connection from %s failed", client_ip.decode())
        await trio.aclose_forcefully(stream)
    finally:
        proxy.client_connections -= 1


async def open_listeners(addresses: tuple[ServerAddress, ...]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    for address in addresses:
        try:
            listeners += await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return listeners


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
    """Accept on every configured address until cancelled; connections run in ``handler_nursery``."""
    listeners = await open_listeners(proxy.server.listen)

    async def handler(stream: trio.abc.Stream) -> None:
        await handle_client(stream, proxy, scheme=b"http", h2_handler=h2_handler)

    addresses = [bound_address(listener) for listener in listeners]
    task_status.started(addresses)
    await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery)
