"""A WSGI app for gunicorn's sync worker behind the proxy in the interop tests.

The sync worker answers every request with ``Connection: close`` and closes the socket, so
the proxy's pool can never reuse a connection to it and must open one per request.

Routes: GET / (plain text, with x-worker-pid), POST /echo (the body back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    pid = ("x-worker-pid", str(os.getpid()))
    if path == "/echo" and environ["REQUEST_METHOD"] == "POST":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        start_response(
            "200 OK",
            [("content-type", "application/octet-stream"), ("content-length", str(len(body))), pid],
        )
        return [body]
    if path == "/":
        body = b"hello from gunicorn\n"
        start_response(
            "200 OK", [("content-type", "text/plain"), ("content-length", str(len(body))), pid]
        )
        return [body]
    start_response("404 Not Found", [("content-type", "text/plain"), ("content-length", "10")])
    return [b"not found\n"]
