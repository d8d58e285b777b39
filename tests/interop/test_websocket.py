"""A WebSocket client (the ``websockets`` library) through the proxy to uvicorn and hypercorn.

The proxy forwards the Upgrade and, after the 101, tunnels raw bytes both ways. The
``websockets`` client is synchronous, so it runs in a worker thread while the proxy keeps
serving in the trio loop.
"""

from __future__ import annotations

import os
import ssl
from functools import partial

import pytest
import trio
from websockets.sync.client import connect

from tests.support.helpers import make_config, start_proxy

from .conftest import TlsSetup, start_tls_proxy


def talk(url: str, ssl_context: ssl.SSLContext | None = None) -> list[object]:
    """Text, a 1 MiB binary message, many small ones, then a clean close; what came back."""
    big = os.urandom(1 << 20)
    received: list[object] = []
    with connect(url, ssl=ssl_context, open_timeout=10, close_timeout=5, max_size=2 << 20) as ws:
        ws.send("hello through the proxy")
        received.append(ws.recv(timeout=10))
        ws.send(big)
        received.append(ws.recv(timeout=10) == big)
        for n in range(100):
            ws.send(f"message {n}")
        received.append(
            [ws.recv(timeout=10) for _ in range(100)] == [f"message {n}" for n in range(100)]
        )
    received.append(ws.close_code)
    return received


@pytest.mark.parametrize("server", ["uvicorn_server", "hypercorn_server"])
async def test_websocket_echo_through_the_proxy(nursery, request, server):
    upstream = request.getfixturevalue(server)
    proxy = await start_proxy(nursery, make_config(upstream.port))
    with trio.fail_after(30):
        received = await trio.to_thread.run_sync(talk, f"ws://127.0.0.1:{proxy.port}/ws")
    assert received == ["hello through the proxy", True, True, 1000]


async def test_secure_websocket_over_the_tls_listener(nursery, uvicorn_server, tls_setup: TlsSetup):
    proxy = await start_tls_proxy(nursery, uvicorn_server.port, tls_setup)
    url = f"wss://127.0.0.1:{proxy.tls_port}/ws"
    with trio.fail_after(30):
        received = await trio.to_thread.run_sync(partial(talk, url, tls_setup.client_context()))
    assert received == ["hello through the proxy", True, True, 1000]
