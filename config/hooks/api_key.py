"""API-key authentication: only requests with a known key reach the upstream.

The key comes as ``X-Api-Key: KEY`` or ``Authorization: Bearer KEY``; the valid keys are in
``$API_KEYS`` (comma-separated), read when the module is imported (at start and when a reload
finds this file changed): set it where the proxy's environment is set, e.g. a systemd
``EnvironmentFile`` or a Kubernetes Secret. A request without a valid key is answered 401 by
the proxy, and the upstream never hears of it; a valid key is removed before the request goes
on, so the upstream (and its logs) never see it.
"""

from __future__ import annotations

import hmac
import os

from pooled_proxy.hooks import Request, Response, bearer_token

# Without any, every request is refused.
API_KEYS = frozenset(
    filter(None, (key.strip() for key in os.environ.get("API_KEYS", "").split(",")))
)


def _known(key: str) -> bool:
    # Every key is compared, in constant time: the time taken tells nothing of a near miss.
    matches = [hmac.compare_digest(key.encode(), known.encode()) for known in API_KEYS]
    return any(matches)


def require_api_key(request: Request) -> Response | None:
    key = request.headers.get("x-api-key") or bearer_token(request)
    if key is None or not _known(key):
        why = "a valid API key is required (X-Api-Key or Authorization: Bearer)"
        return Response(401, f"401 Unauthorized: {why}\n",
                        headers=[("www-authenticate", 'Bearer realm="api"')])  # fmt: skip
    request.headers.remove("x-api-key")
    request.headers.remove("authorization")
    return None
