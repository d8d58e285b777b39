"""Local ports for the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A local port nothing listens on (bound, then let go): connecting to it is refused,
    and a server started next may take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
