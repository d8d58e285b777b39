"""Opening upstream connections: an IP address is connected to directly, a name is looked up."""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from pooled_proxy.config import ServerAddress
from pooled_proxy.errors import ConnectTimeout, UpstreamConnectError
from pooled_proxy.upstream.connection import open_connection


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _echo_listener(nursery: trio.Nursery, host: str) -> int:
    """A listener that answers every read with what it read, upper-cased; its port."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            async for data in stream:
                await stream.send_all(data.upper())

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host=host))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _round_trip(server: ServerAddress) -> tuple[bytes, str]:
    """Bytes through a connection opened to ``server`` and the peer address it reached."""
    connection = await open_connection(server, connect_timeout=5)
    stream = connection._stream
    assert isinstance(stream, trio.SocketStream)
    try:
        await stream.send_all(b"ping")
        reply = await stream.receive_some(4)
        peer = stream.socket.getpeername()[0]
        # Nagle off as on every proxied connection (trio's SocketStream sets it).
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        connection.close()
    return reply, peer


@pytest.mark.parametrize(
    ("listen", "upstream_host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        pytest.param(
            "::1",
            "::1",
            marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback"),
        ),
        ("127.0.0.1", "localhost"),  # a name: looked up, then connected
    ],
)
async def test_connects_to_addresses_and_names(
    nursery: trio.Nursery, listen: str, upstream_host: str
) -> None:
    port = await _echo_listener(nursery, listen)
    reply, peer = await _round_trip(ServerAddress(upstream_host, port))
    assert reply == b"PING"
    assert peer in ("127.0.0.1", "::1")


async def test_refused_address_is_a_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, never listening: connects are refused
        with pytest.raises(UpstreamConnectError, match="Connection refused") as refused:
            await open_connection(ServerAddress("127.0.0.1", port), connect_timeout=5)
    assert refused.value.proxy_status == "connection_refused"


async def test_address_that_never_answers_times_out(autojump_clock: trio.abc.Clock) -> None:
    # A listener whose accept queue is full leaves further SYNs unanswered.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # the backlog of 0 holds one or two, depending on the kernel
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            with pytest.raises(ConnectTimeout, match="timed out after 3s"):
                await open_connection(ServerAddress("127.0.0.1", port), connect_timeout=3)
        finally:
            for filler in fillers:
                filler.close()
