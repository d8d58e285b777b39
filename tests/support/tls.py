"""The proxy with a TLS listener, on real sockets."""

from __future__ import annotations

from pooled_proxy.config import TlsConfig
from tests.support.helpers import make_config


async def tls_port(nursery, upstream_port: int, tls: TlsConfig, **server) -> tuple[int, int]:
    """Start the proxy with [server.tls]; returns (cleartext port, TLS port)."""
    from pooled_proxy.daemon.lifecycle import serve
    from pooled_proxy.proxy import Proxy

    proxy = Proxy(make_config(upstream_port, server={"tls": tls, **server}))
    addresses = await nursery.start(serve, proxy)
    plain = [a.port for a in addresses if not a.tls]
    secure = [a.port for a in addresses if a.tls]
    assert len(plain) == 1 and len(secure) == 1, addresses
    return plain[0], secure[0]
