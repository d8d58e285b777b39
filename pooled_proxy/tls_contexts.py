"""Every SSL context the proxy uses, built from the config's TLS files: the listener's
(``[server.tls]``) and one per upstream that has ``https://`` servers.

Building a context reads files, and for an upstream without ``tls_ca`` the system's CA
bundle: tens of milliseconds of CPU. So each is built once per config load (at start, and on
reload in the reload's thread), never on the event loop for a connection. A file that does
not load (not PEM, a key that does not match its certificate, an encrypted key, a CA file
with no certificate in it) is a ``ConfigError`` naming the key's line, like every other
config problem, so ``check`` reports it and a reload keeps the running config.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .config import Config, TlsConfig, UpstreamConfig, problem_after_load
from .errors import ConfigError, ConfigProblem

LOG = logging.getLogger("pooled_proxy.tls")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
# RFC 9113 section 9.2: HTTP/2 over TLS needs TLS 1.2 or later with an ephemeral key exchange
# and an AEAD cipher; TLS 1.3 suites are all fine and not affected by set_ciphers.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# What an upstream's connections speak, said by ALPN: an HTTP/1.1 upstream says so, so that a
# server that also speaks h2 does not pick it; an HTTP/2 one (protocol = "h2") offers h2 only.
UPSTREAM_ALPN = ["http/1.1"]
UPSTREAM_ALPN_H2 = ["h2"]


def _no_passphrase() -> bytes:
    # Never a prompt on the terminal: an encrypted key fails to load, as a config error.
    return b""


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The listener's context for ``[server.tls]``; raises ``ssl.SSLError``/``OSError`` if the
    certificate and key do not load together."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_ciphers(TLS12_CIPHERS)
    context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    return context


class _FileProblem(Exception):
    """A TLS file that does not load, and the config key that names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def upstream_ssl_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """The client context for the ``https://`` servers of ``upstream``: its ``tls_ca`` (else
    the system's CAs), hostname checks unless ``tls_verify = false``, its client certificate,
    and ALPN for the protocol it speaks."""
    if not upstream.tls_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            # With a cafile, only that bundle is trusted (the system's CAs are not loaded).
            cafile = str(upstream.tls_ca) if upstream.tls_ca is not None else None
            context = ssl.create_default_context(cafile=cafile)
        except (ssl.SSLError, OSError) as exc:
            raise _FileProblem(
                "tls_ca", f"cannot load CA certificates from {cafile}: {exc}"
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if upstream.tls_cert is not None and upstream.tls_key is not None:
        try:
            context.load_cert_chain(upstream.tls_cert, upstream.tls_key, password=_no_passphrase)
        except (ssl.SSLError, OSError) as exc:
            why = f"cannot load the client certificate with its key ({upstream.tls_cert}, "
            raise _FileProblem("tls_cert", f"{why}{upstream.tls_key}): {exc}") from None
    if upstream.protocol == "h2":
        # RFC 9113 section 9.2, as for the listener: TLS 1.2 needs an AEAD suite.
        context.set_ciphers(TLS12_CIPHERS)
        context.set_alpn_protocols(UPSTREAM_ALPN_H2)
    else:
        context.set_alpn_protocols(UPSTREAM_ALPN)
    return context


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The contexts of one config load: the listener's, and each TLS upstream's by name."""

    server: ssl.SSLContext | None = None
    upstreams: Mapping[str, ssl.SSLContext] = field(default_factory=lambda: MappingProxyType({}))


def load_tls_contexts(config: Config) -> TlsContexts:
    """Build every context of ``config``; a ``ConfigError`` lists every file that does not load."""
    problems: list[ConfigProblem] = []
    server = None
    tls = config.server.tls
    if tls is not None:
        try:
            server = server_ssl_context(tls)
        except (ssl.SSLError, OSError) as exc:
            why = f"cannot load the certificate with its key ({tls.cert}, {tls.key}): {exc}"
            problems.append(problem_after_load(config, ("server", "tls", "cert"), why))
    upstreams = {}
    for name, upstream in config.upstreams.items():
        if not upstream.tls:
            continue
        try:
            upstreams[name] = upstream_ssl_context(upstream)
        except _FileProblem as exc:
            problems.append(problem_after_load(config, ("upstreams", name, exc.key), str(exc)))
    if problems:
        raise ConfigError(problems)
    return TlsContexts(server, MappingProxyType(upstreams))


def warn_unverified(config: Config) -> None:
    """Log each upstream whose servers' certificates are not checked (``tls_verify = false``)."""
    for name, upstream in config.upstreams.items():
        if upstream.tls and not upstream.tls_verify:
            LOG.warning(
                "upstream %s: tls_verify = false: its servers' certificates are not checked, "
                "anyone on the path can impersonate them (for development only)",
                name,
            )
