"""What the forwarder, the balancer and the metrics use of an upstream server's pool and of
what it hands out, whichever protocol the server speaks: an HTTP/1.1 connection
(upstream.py, pool.py) or an HTTP/2 stream (upstream_h2.py, pool_h2.py)."""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from ..config import ServerAddress, UpstreamConfig
from ..headers import Headers
from .connection import ResponseHead
from .pool import PoolStatistics


class UpstreamChannel(Protocol):
    """The upstream side of one exchange."""

    server: ServerAddress
    connect_time: float | None  # opening its connection took this, when it was new
    received_bytes: int  # of the response so far: none means the upstream never answered
    upgraded: bool  # switched protocols (HTTP/1.1's 101): a tunnel owns it now
    http_version: bytes  # as Via names it: b"1.1", b"2"

    async def send_request(
        self,
        method: bytes,
        target: bytes,
        headers: Headers,
        *,
        end: bool,
        body: bytes = b"",
        valid_syntax: bool = False,
    ) -> None:
        """``valid_syntax``: the method, target and fields are known to be in the HTTP
        grammar (the request validation passed them)."""
        ...

    @property
    def trailers(self) -> Headers:
        """The response's trailers, once it ended."""
        ...

    def response_at_hand(self) -> bool:
        """Whether the next response event (its head, after a request) can be had without
        waiting (the forwarder calls the exchange's ``on_wait`` when it cannot)."""
        ...

    async def send_body(self, chunk: bytes) -> None: ...

    async def end_body(self) -> None: ...

    async def receive_response_head(self, deadline: float = math.inf) -> ResponseHead: ...

    def buffered_body(self) -> tuple[bytes, bool]: ...

    async def receive_data(self, deadline: float = math.inf) -> bytes | None: ...

    def close(self) -> None:
        """Give up on the exchange (a timeout); the pool is told with ``release`` after."""


class ServerPool(Protocol):
    """The pool of one upstream server."""

    server: ServerAddress
    config: UpstreamConfig
    ssl_context: ssl.SSLContext | None

    @property
    def load(self) -> int: ...

    def take_idle(self, *, replayable: bool = True) -> UpstreamChannel | None:
        """What ``acquire`` would hand out at once, without waiting; ``None`` if it would have
        to wait."""
        ...

    async def acquire(
        self,
        *,
        replayable: bool = True,
        on_wait: Callable[[], None] | None = None,
        fresh: bool = False,
    ) -> tuple[UpstreamChannel, bool]:
        """``on_wait`` (the exchange's) is called when the request has to wait: before a
        connect, or once a wait in the queue has lasted a while (the pool's reaper calls it:
        most queue waits end sooner, and need no watch on the client). ``fresh``: a new
        connection rather than an idle one, where the pool has room for one."""
        ...

    async def open_unpooled(self) -> UpstreamChannel:
        """For a health probe: outside the pool's accounting; ``close()`` ends it all."""
        ...

    # ``connection`` is what this pool's acquire() handed out (each pool its own kind).
    def release(self, connection: Any, *, reusable: bool, close_reason: str = "error") -> None: ...

    def closed_under_us(self, connection: Any) -> bool:
        """The server closed a reused connection before any of the response: True if that
        was the keep-alive race (a close as the request went up), False if the server
        failed on the request."""
        ...

    def end_waits_by(self, deadline: float) -> None:
        """No request waits in the queue past ``deadline`` (the drain's)."""

    def statistics(self) -> PoolStatistics: ...

    async def run_reaper(self) -> None: ...

    def close(self) -> None: ...
