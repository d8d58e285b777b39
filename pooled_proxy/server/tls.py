"""TLS listeners: ALPN offers ``h2`` and ``http/1.1``; the client's choice picks the front end.

The handshake happens in the connection's own task (never in the accept loop) under
``header_timeout``, so a client that connects and stalls the handshake holds nothing but
itself. After it, ALPN ``h2`` goes straight to the HTTP/2 front end; anything else (ALPN
``http/1.1`` or no ALPN at all) goes through the same preface sniffing as cleartext, so a
client with HTTP/2 prior knowledge but no ALPN still gets HTTP/2.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import replace

import trio

from ..config import Config, ServerAddress, TlsConfig, key_line
from ..errors import ConfigError, ConfigProblem
from ..proxy import Proxy
from .listen import H2Handler, accept_until_drain, bound_address, handle_client, open_listeners

LOG = logging.getLogger("pooled_proxy.tls")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
# RFC 9113 section 9.2: HTTP/2 over TLS needs TLS 1.2 or later with an ephemeral key exchange
# and an AEAD cipher; TLS 1.3 suites are all fine and not affected by set_ciphers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server-side context for ``[server.tls]``; raises ``ssl.SSLError``/``OSError`` if the
    certificate and key cannot be loaded (the config check reports that before we get here)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)
    # No passphrase prompt on the terminal: an encrypted key fails to load, as a config error.
    context.load_cert_chain(tls.cert, tls.key, password=lambda: b"")
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


def check_certificate(config: Config) -> None:
    """Raise a ``ConfigError`` naming ``server.tls.cert`` if the certificate and key do not
    load together (not PEM, wrong key, encrypted key): the config loader only checks that the
    files can be read."""
    tls = config.server.tls
    if tls is None:
        return
    try:
        server_ssl_context(tls)
    except (ssl.SSLError, OSError) as exc:
        path = config.path or "<config>"
        line = key_line(path, ("server", "tls", "cert")) if config.path else 1
        why = f"cannot load the certificate with its key ({tls.cert}, {tls.key}): {exc}"
        raise ConfigError([ConfigProblem(str(path), line, "server.tls.cert", why)]) from None


async def handle_tls_client(
    stream: trio.SSLStream[trio.abc.Stream], proxy: Proxy, *, h2_handler: H2Handler | None
) -> None:
    try:
        with trio.fail_after(proxy.server.header_timeout):
            await stream.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        LOG.debug("TLS handshake failed: %s", exc)
        await trio.aclose_forcefully(stream)
        return
    await handle_client(
        stream,
        proxy,
        scheme=b"https",
        h2_handler=h2_handler,
        alpn=stream.selected_alpn_protocol(),
    )


async def serve_tls_listeners(
    proxy: Proxy,
    handler_nursery: trio.Nursery,
    *,
    h2_handler: H2Handler | None = None,
    context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[list[ServerAddress]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept TLS clients on ``[server.tls] listen`` until the drain starts, as
    ``serve_listeners`` does for cleartext; reports the bound addresses with ``tls=True``."""
    tls = proxy.server.tls
    if tls is None:
        task_status.started([])
        return
    context = context or server_ssl_context(tls)
    listeners = await open_listeners(tls.listen, reuse_port=proxy.server.workers > 1)

    async def handler(stream: trio.abc.Stream) -> None:
        tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
        await handle_tls_client(tls_stream, proxy, h2_handler=h2_handler)

    task_status.started([replace(bound_address(listener), tls=True) for listener in listeners])
    await accept_until_drain(listeners, handler, handler_nursery, proxy.drain_started)
