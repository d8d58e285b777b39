"""The HTTP/1.1 codec, sans-IO: the grammar (_abnf.py), the strict parser (parse.py), the
serializer's direct path (write.py) and the server- and client-side connection objects
(connection.py) that decide, per message, between the direct path and h11."""

from __future__ import annotations

from .connection import (
    CLOSED,
    END,
    NEED_DATA,
    ClientConnection,
    Request,
    ResponseHead,
    ServerConnection,
)
from .parse import Violation
from .write import REASONS, Unwritable, raw_response

__all__ = [
    "CLOSED",
    "END",
    "NEED_DATA",
    "REASONS",
    "ClientConnection",
    "Request",
    "ResponseHead",
    "ServerConnection",
    "Unwritable",
    "Violation",
    "raw_response",
]
