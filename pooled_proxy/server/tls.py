"""TLS listeners: ALPN offers ``h2`` and ``http/1.1``; the client's choice picks the front end.

The handshake happens in the connection's own task (never in the accept loop), within the
one ``header_timeout`` that the handshake and the first request head share, so a client that
connects and stalls the handshake holds nothing but itself. After it, ALPN ``h2`` goes straight to the HTTP/2 front end; anything else (ALPN
``http/1.1`` or no ALPN at all) goes through the same preface sniffing as cleartext, so a
client with HTTP/2 prior knowledge but no ALPN still gets HTTP/2.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import trio

from ..config import ServerAddress
from ..proxy import PENDING, Proxy
from .listen import (
    H2Handler,
    accept_until_drain,
    bound_address,
    handle_client,
    open_listeners,
    worker_group,
)

LOG = logging.getLogger("pooled_proxy.tls")


async def handle_tls_client(
    stream: trio.SSLStream[trio.abc.Stream], proxy: Proxy, *, h2_handler: H2Handler | None
) -> None:
    # One header_timeout for the handshake and the first request head together.
    head_deadline = trio.current_time() + proxy.server.header_timeout
    proxy.connections_by_protocol[PENDING] += 1
    try:
        with trio.fail_at(head_deadline):
            await stream.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        LOG.debug("TLS handshake failed: %s", exc)
        await trio.aclose_forcefully(stream)
        return
    finally:
        proxy.connections_by_protocol[PENDING] -= 1
    await handle_client(
        stream,
        proxy,
        scheme=b"https",
        h2_handler=h2_handler,
        alpn=stream.selected_alpn_protocol(),
        head_deadline=head_deadline,
    )


async def serve_tls_listeners(
    proxy: Proxy,
    handler_nursery: trio.Nursery,
    *,
    h2_handler: H2Handler | None = None,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TLS clients on ``[server.tls] listen`` until the drain starts, as
    ``serve_listeners`` does for cleartext; reports the bound addresses with ``tls=True``.

    Each connection takes the proxy's server context of the moment: a reload that loaded a
    new certificate serves it to new clients, while connections already open keep theirs."""
    tls = proxy.server.tls
    if tls is None:
        task_status.started([])
        return
    group = worker_group(proxy)
    listeners = await open_listeners(tls.listen, group=group)

    async def handler(stream: trio.abc.Stream) -> None:
        context = proxy.tls.server
        assert context is not None  # loaded with the config, since [server.tls] is set
        tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        await handle_tls_client(tls_stream, proxy, h2_handler=h2_handler)

    task_status.started([replace(bound_address(listener), tls=True) for listener in listeners])
    await accept_until_drain(listeners, handler, handler_nursery, proxy.drain_started, group)
