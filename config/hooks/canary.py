"""Canary routing by cookie: a share of the users go to the ``web_canary`` upstream.

A user's first request is assigned at random (``CANARY_SHARE``) and gets a ``canary`` cookie
that keeps them on the same side afterwards; ``canary=1`` or ``canary=0`` can also be set by
hand (a tester opting in). The decision is made before the upstream is chosen, so one user's
requests all go to one version of the site.
"""

from __future__ import annotations

import random

from pooled_proxy.hooks import Request, ResponseHead, cookie

CANARY_UPSTREAM = "web_canary"
CANARY_SHARE = 0.05  # of new users
COOKIE_MAX_AGE = 24 * 3600


def route_by_cookie(request: Request) -> None:
    choice = cookie(request, "canary")
    if choice not in ("0", "1"):
        choice = "1" if random.random() < CANARY_SHARE else "0"
        set_cookie = f"canary={choice}; Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"

        def remember(response: ResponseHead) -> None:
            response.headers.add("set-cookie", set_cookie)

        request.on_response(remember)
    if choice == "1":
        request.upstream = CANARY_UPSTREAM
