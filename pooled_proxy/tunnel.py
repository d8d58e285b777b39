"""HTTP/1.1 ``Upgrade: websocket``: which requests may switch protocols, and the raw two-way
byte tunnel that replaces HTTP on both connections after the upstream's ``101``.

The header helpers are pure. :func:`run_tunnel` is the trio shell: one task per direction,
each reading one chunk and writing it completely before reading the next, so a peer that
stops reading stops the other peer's sending (backpressure) and memory stays at two chunks.
An end-of-stream from one side is passed on as a half-close (``send_eof``) and the other
direction keeps flowing until it ends too; both streams are closed when the tunnel ends.

Idle timeout: the tunnel closes when *neither* side has sent a byte for ``idle_timeout``
(the upstream's ``read_timeout``, "0s" = never). A half-open TCP connection to a vanished
client shows no error without TCP keepalive, so without a limit a dead tunnel would hold a
socket and one of the upstream's ``max_connections`` forever; WebSocket applications that are
legitimately silent for longer keep the tunnel open with ping frames, which count as traffic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import trio

from .fastio import MAX_RECEIVE
from .headers import Headers, client_response_headers, connection_tokens

CLOSE_NOTIFY_TIMEOUT = 1.0  # a TLS close_notify may wait this long for a peer that does not read
# Protocols we tunnel. Others (e.g. h2c) are refused the upgrade: the request is forwarded
# as an ordinary one, without its Upgrade header, and the answer is an ordinary response.
TUNNELED_PROTOCOLS = frozenset({b"websocket"})

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def requested_upgrade(headers: Headers) -> bytes | None:
    """The ``Upgrade`` value of a request that asks to switch to a tunneled protocol, else None.

    Both headers are needed: ``Upgrade: websocket`` and a ``Connection`` header naming
    ``upgrade`` (RFC 9110 section 7.8). Only a single protocol is accepted.
    """
    if b"upgrade" not in connection_tokens(headers):
        return None
    values = [value.strip() for name, value in headers if name == b"upgrade"]
    if len(values) != 1 or b"," in values[0]:
        return None
    protocol = values[0].split(b"/", 1)[0].strip().lower()
    return values[0] if protocol in TUNNELED_PROTOCOLS else None


def upgrade_request_headers(upgrade: bytes) -> Headers:
    """Added back to an upgrade request after the hop-by-hop headers were stripped."""
    return [(b"connection", b"upgrade"), (b"upgrade", upgrade)]


def switched_response_headers(upstream_headers: Headers) -> Headers:
    """The client's ``101`` headers: the upstream's, minus hop-by-hop ones, plus the switch."""
    upgrade = next((value for name, value in upstream_headers if name == b"upgrade"), b"websocket")
    return [
        (b"connection", b"upgrade"),
        (b"upgrade", upgrade),
        *client_response_headers(upstream_headers, protocol=b"1.1"),
    ]


@dataclass(slots=True)
class TunnelStats:
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    # Who ended it: "client" / "upstream" (the first orderly end-of-stream), "client_error" /
    # "upstream_error" (reset or broken), "idle_timeout", or "cancelled" (e.g. drain deadline).
    closed_by: str = ""


class _Tunnel:
    def __init__(
        self,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        idle_timeout: float,
        stats: TunnelStats,
    ) -> None:
        self.streams = {"client": client, "upstream": upstream}
        self.idle_timeout = idle_timeout
        self.stats = stats
        self.last_activity = trio.current_time()
        self.directions_open = 2
        self.scope = trio.CancelScope()

    def _end(self, closed_by: str) -> None:
        if not self.stats.closed_by:
            self.stats.closed_by = closed_by
        self.scope.cancel()

    def _count(self, source: str, size: int) -> None:
        if source == "client":
            self.stats.bytes_up += size
        else:
            self.stats.bytes_down += size

    async def _copy(self, source: str, sink: str, pending: bytes) -> None:
        receiver, sender = self.streams[source], self.streams[sink]
        data: bytes | bytearray = pending
        while True:
            if data:
                try:
                    await sender.send_all(data)
                except _STREAM_ERRORS:
                    self._end(f"{sink}_error")
                    return
                self._count(source, len(data))
            try:
                data = await receiver.receive_some(MAX_RECEIVE)
            except _STREAM_ERRORS:
                self._end(f"{source}_error")
                return
            if not data:
                break
            self.last_activity = trio.current_time()
        # Orderly end-of-stream from ``source``: pass the half-close on, and let the other
        # direction finish (a WebSocket close handshake may still be under way).
        if not self.stats.closed_by:
            self.stats.closed_by = source
        self.directions_open -= 1
        if self.directions_open == 0 or not isinstance(sender, trio.abc.HalfCloseableStream):
            # Both directions are done, or (TLS) the sink cannot be half-closed: the end.
            self.scope.cancel()
            return
        try:
            await sender.send_eof()
        except _STREAM_ERRORS:
            self._end(f"{sink}_error")

    async def _watch_idle(self) -> None:
        while True:
            deadline = self.last_activity + self.idle_timeout
            if trio.current_time() >= deadline:
                self._end("idle_timeout")
                return
            await trio.sleep_until(deadline)

    async def run(self, client_data: bytes, upstream_data: bytes) -> TunnelStats:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._copy, "client", "upstream", client_data)
                    nursery.start_soon(self._copy, "upstream", "client", upstream_data)
                    if self.idle_timeout < math.inf:
                        nursery.start_soon(self._watch_idle)
        finally:
            if not self.stats.closed_by:
                self.stats.closed_by = "cancelled"
            for stream in self.streams.values():
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT, shield=True):
                    await stream.aclose()
        return self.stats


async def run_tunnel(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    *,
    client_data: bytes = b"",
    upstream_data: bytes = b"",
    idle_timeout: float = math.inf,
    stats: TunnelStats | None = None,
) -> TunnelStats:
    """Copy bytes both ways until both sides have closed, one fails, or the tunnel idles out.

    ``client_data`` and ``upstream_data`` are bytes each side sent right behind its HTTP head
    (already read by the HTTP parser); they are delivered first. Both streams are closed on
    return, and on cancellation. ``stats`` is filled in as bytes move, so a caller that is
    cancelled (a drain deadline) still knows what went through.
    """
    tunnel = _Tunnel(client, upstream, idle_timeout, stats or TunnelStats())
    return await tunnel.run(client_data, upstream_data)
