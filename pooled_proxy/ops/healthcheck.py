"""``pooled-proxy healthcheck``: is the proxy that this config describes up? For a container's
HEALTHCHECK, which runs inside the container next to the proxy.

With an ``[admin]`` listener it asks ``/readyz`` (200 while serving, 503 once a drain began);
without one, it connects to the first listen address: a proxy that accepts is up. Wildcard
listen hosts are probed on the loopback address of their family. Synchronous and standalone:
it runs in a fresh process every few seconds, so it starts nothing it does not need.
"""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass, replace

from ..config import Config, ServerAddress
from .admin import READY_PATH

_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str  # one line, for `docker inspect` and the terminal


def probe_address(address: ServerAddress) -> ServerAddress:
    """Where to connect to reach a listener bound to ``address``."""
    return ServerAddress(_LOOPBACK.get(address.host, address.host), address.port, address.tls)


def _url(address: ServerAddress, path: str) -> str:
    return f"http://{address}{path}"


def check_admin(address: ServerAddress, timeout: float) -> Health:
    url = _url(address, READY_PATH)
    connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request("GET", READY_PATH, headers={"User-Agent": "pooled-proxy healthcheck"})
        response = connection.getresponse()
        body = response.read(200).decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return Health(False, f"unhealthy: {url}: {exc or type(exc).__name__}")
    finally:
        connection.close()
    said = f"{response.status} {body}".strip()
    if response.status == 200:
        return Health(True, f"healthy: {url} answered {said}")
    return Health(False, f"unhealthy: {url} answered {said}")


def check_listener(address: ServerAddress, timeout: float) -> Health:
    scheme = "https" if address.tls else "http"
    where = f"{scheme}://{address}"
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            pass
    except OSError as exc:
        return Health(False, f"unhealthy: cannot connect to {where}: {exc.strerror or exc}")
    return Health(True, f"healthy: {where} accepts connections (no [admin] to ask /readyz)")


def check(config: Config, *, timeout: float) -> Health:
    if config.admin is not None:
        if config.admin.listen.port == 0:
            return Health(False, "unhealthy: cannot probe: [admin] listens on port 0")
        return check_admin(probe_address(config.admin.listen), timeout)
    tls = config.server.tls
    listeners = [*config.server.listen]
    if tls is not None:
        listeners += [replace(address, tls=True) for address in tls.listen]
    for address in listeners:
        if address.port != 0:
            return check_listener(probe_address(address), timeout)
    return Health(False, "unhealthy: cannot probe: every listen address has port 0")
