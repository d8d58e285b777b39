"""Pure routing: (host, path) -> the route that serves it. First match wins, in config order."""

from __future__ import annotations

from collections.abc import Sequence

from .config import RouteConfig


def host_matches(pattern: str | None, host: str) -> bool:
    """``None`` matches any host; ``*.example.com`` matches any subdomain, not the apex."""
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Prefixes match on segment boundaries: ``/api`` matches ``/api`` and ``/api/x``, not ``/apix``."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


def normalize_host(authority: bytes) -> str:
    """The Host header or ``:authority`` without port, lower-case (IPv6 brackets kept)."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if ":" in host else host


class Router:
    """Routes built once from config; ``match`` runs per request."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._routes = tuple(routes)

    def match(self, authority: bytes, path: bytes) -> RouteConfig | None:
        host = normalize_host(authority)
        text = path.decode("latin-1")
        for route in self._routes:
            if host_matches(route.host, host) and path_matches(route.path_prefix, text):
                return route
        return None


def rewrite_target(route: RouteConfig, target: bytes) -> bytes:
    """The request target sent upstream: with ``strip_prefix``, the route's prefix removed
    (when the target still has it: a hook may have changed it)."""
    if not route.strip_prefix or route.path_prefix == "/":
        return target
    prefix = route.path_prefix.rstrip("/").encode("latin-1")
    rest = target[len(prefix) :]
    if not target.startswith(prefix) or rest[:1] not in (b"", b"/", b"?"):
        return target
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest
