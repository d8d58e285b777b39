"""The HTTP/1.1 response writer: the ResponseSink the forwarder writes a client's response to.

The server side of the HTTP/1.1 codec turns each call into bytes; this writes them to the
client, with the write timeout, and maps the codec's and the socket's errors to
:class:`~pooled_proxy.errors.ClientDisconnected`.
"""

from __future__ import annotations

import math

import trio

from .. import fastio
from ..errors import ClientDisconnected
from ..exchange import ExchangeRecord
from ..headers import Headers, comma_tokens, trailer_fields
from ..protocol.http1 import ServerConnection, Unwritable
from ..proxy import Proxy


class ResponseWriter:
    """Writes one client connection's responses, one exchange at a time (the ResponseSink and
    ClientUpgrade protocols of exchange.py)."""

    def __init__(self, stream: trio.abc.Stream, http: ServerConnection, proxy: Proxy) -> None:
        self.stream = stream
        self._http = http
        self._proxy = proxy
        # The exchange in progress: the body bytes that got out are counted in it.
        self.record: ExchangeRecord | None = None
        self.head_sent = False
        # The connection closes after this response (a request limit, a client's mistake):
        # its head says so.
        self.close_after = False

    def start(self, record: ExchangeRecord, *, close_after: bool) -> None:
        """A new exchange begins."""
        self.record = record
        self.head_sent = False
        self.close_after = close_after

    async def write(self, data: bytes) -> None:
        write_timeout = self._proxy.server.write_timeout or math.inf
        try:
            await fastio.send_all(self.stream, data, write_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientDisconnected(f"client went away: {exc}") from None
        except trio.TooSlowError:
            raise ClientDisconnected(f"client did not read for {write_timeout:g}s") from None

    async def send_informational(self, status: int, headers: Headers) -> None:
        try:
            data = self._http.send_informational(status, headers)
        except Unwritable as exc:
            raise ClientDisconnected(f"cannot send response: {exc}") from None
        if data:
            await self.write(data)

    async def send_head(
        self, status: int, headers: Headers, *, body: bytes = b"", end: bool = False
    ) -> None:
        close = self.close_after or self._proxy.draining
        try:
            data = self._http.send_response(status, headers, body, end=end, close=close)
        except Unwritable as exc:
            raise ClientDisconnected(f"cannot send response: {exc}") from None
        self.head_sent = True
        await self.write(data)  # head, body and end in one write
        if self.record is not None:
            self.record.bytes_out += len(body)

    async def send_data(self, data: bytes) -> None:
        try:
            payload = self._http.send_data(data)
        except Unwritable as exc:
            raise ClientDisconnected(f"cannot send response: {exc}") from None
        await self.write(payload)
        if self.record is not None:
            self.record.bytes_out += len(data)

    async def end(self, trailers: Headers | None = None) -> None:
        # Trailers go to a client that said it takes them (TE: trailers) on a chunked
        # response, the only framing that can carry them; otherwise they are dropped.
        if trailers:
            trailers = trailer_fields(trailers) if self._takes_trailers() else None
        try:
            data = self._http.send_end(trailers)
        except Unwritable as exc:
            raise ClientDisconnected(f"cannot send response: {exc}") from None
        if data:  # a chunked body's last chunk; a Content-Length body has nothing left to send
            await self.write(data)

    def _takes_trailers(self) -> bool:
        """The response is chunked and its client sent ``TE: trailers`` (read only when there
        are trailers to send, so the common response pays nothing for it)."""
        record = self.record
        return (
            self._http.can_send_trailers
            and record is not None
            and any(
                name == b"te" and b"trailers" in comma_tokens(value)
                for name, value in record.request_headers
            )
        )

    async def switch_protocols(self, headers: Headers) -> tuple[trio.abc.Stream, bytes]:
        """Send the upstream's 101; from here the connection belongs to a tunnel."""
        try:
            data, behind = self._http.send_switch(headers)
        except Unwritable as exc:
            raise ClientDisconnected(f"cannot switch protocols: {exc}") from None
        self.head_sent = True
        await self.write(data)
        return self.stream, behind

    async def reset(self, error_code: int = 0x2) -> None:
        """Abort: close the connection mid-response so the client sees it incomplete (HTTP/1.1
        has no error code to give)."""
        self._http.send_failed()
        await trio.aclose_forcefully(self.stream)
