"""The HTTP/1.1 client watch: notices a client that leaves while its exchange waits.

Otherwise a client leaving a quiet SSE stream or a slow response would only be noticed at
the next write, which may be minutes away; cancelled, the exchange closes its upstream
connection instead of pooling it, so the upstream sees the disconnect too. Like nginx, a
half-close (EOF) counts as leaving. Bytes that arrive instead are the next request
(pipelined, or sent after the response): they go to the codec, kept for the next cycle, and
the watch ends until the next exchange arms it.

One task for the connection's life rather than one per exchange, started the first time an
exchange's wait needs it (a connect, or a wait for the pool or the upstream that lasts the
pool's ``WATCH_AFTER``; one answered sooner never does, and then costs no task switch).
Armed, it keeps waiting through the end of the exchange into the idle time after it, so the
next request arrives through it and nothing is started or cancelled per request.
"""

from __future__ import annotations

import trio

from .. import fastio
from ..errors import ClientDisconnected
from ..exchange import ExchangeRecord
from ..protocol.http1 import ServerConnection


class ClientWatch:
    """Owns the receive side of a client connection from when it is armed until it has read
    something (or the end of the stream)."""

    def __init__(self, stream: trio.abc.Stream, http: ServerConnection) -> None:
        self._stream = stream
        self._http = http
        # Where the watch task runs; cancelling its scope cancels the exchange with the whole
        # connection (which costs nothing per request, unlike a cancel scope of its own).
        self.nursery: trio.Nursery | None = None
        self.record: ExchangeRecord | None = None  # the exchange in progress a disconnect cancels
        self.client_gone = False
        # Set when the armed watch has read: the connection loop waits on it for the next
        # request instead of reading itself.
        self.delivered: trio.Event | None = None
        self._started = False
        self._armed = trio.Event()

    def arm(self) -> None:
        """From now the watch owns the receive side. Idempotent."""
        if self.delivered is not None or self.nursery is None:
            return
        if not self._started:
            self._started = True
            self.nursery.start_soon(self._run)
        self.delivered = trio.Event()
        self._armed.set()

    async def _run(self) -> None:
        while True:
            await self._armed.wait()
            try:
                data = await fastio.receive_some(self._stream, fastio.MAX_RECEIVE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            self._armed = trio.Event()
            delivered, self.delivered = self.delivered, None
            if data:
                self._http.receive_data(data)
            else:
                self.client_gone = True
                record = self.record
                # Gone after the whole response (a Content-Length body is complete on the
                # wire before its end is sent) is a normal close, not a disconnect.
                if record is not None and not self._http.response_complete:
                    record.error = record.error or ClientDisconnected.proxy_status
                    if self.nursery is not None:
                        self.nursery.cancel_scope.cancel()  # the exchange and the connection
            if delivered is not None:
                delivered.set()
