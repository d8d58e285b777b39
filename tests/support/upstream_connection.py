"""Driving an upstream connection's codec by hand."""

from __future__ import annotations

from pooled_proxy.protocol.http1 import ResponseHead
from pooled_proxy.upstream.connection import UpstreamConnection


def finish_exchange(connection: UpstreamConnection, response: bytes = b"") -> None:
    """Walk the codec through one complete exchange, so it is reusable."""
    conn = connection._http
    conn.send_request(b"GET", b"/", [(b"host", b"x")], end=True)
    conn.receive_data(response or b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert isinstance(conn.next_event(), ResponseHead)
    assert conn.buffered_body() == (b"", True)
