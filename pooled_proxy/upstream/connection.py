"""One keep-alive HTTP/1.1 connection to an upstream server: a thin trio shell around the
client side of the HTTP/1.1 codec (``protocol/http1``), which reads and writes the messages.

Everything above this module sees only :mod:`pooled_proxy.errors`, never trio exceptions or
the codec's: they are mapped once, here. The keep-alive rules are the codec's: reusable only
after a complete response with nothing behind it, from an HTTP/1.1 upstream that did not say
``Connection: close``.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import math
import os
import select
import socket
import ssl
from typing import Any

import trio

from .. import fastio
from ..config import ServerAddress
from ..errors import (
    ConnectTimeout,
    ProxyInternalError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTlsAlert,
    UpstreamTlsCertificateError,
    UpstreamTlsError,
)
from ..headers import Headers, keep_alive_timeout
from ..protocol.http1 import END, NEED_DATA, ClientConnection, ResponseHead, Unwritable, Violation
from ..protocol.http1.connection import ClientEvent

__all__ = ["ResponseHead", "UpstreamConnection", "open_connection"]

MAX_RESPONSE_HEAD = 64 * 1024
# Retire a connection this long before the upstream's advertised Keep-Alive timeout, so we
# never send on a socket the upstream is about to close (the keep-alive race).
KEEPALIVE_SAFETY_MARGIN = 1.0


async def open_connection(
    server: ServerAddress,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> UpstreamConnection:
    """A new connection to ``server``; see :func:`open_stream`."""
    stream = await open_stream(
        server, connect_timeout=connect_timeout, ssl_context=ssl_context, server_name=server_name
    )
    return UpstreamConnection(stream, server)


async def open_stream(
    server: ServerAddress,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    server_name: str | None = None,
) -> trio.abc.Stream:
    """A new byte stream to ``server``; an https:// one goes through a TLS handshake with
    ``ssl_context`` (its upstream's, built once), sending ``server_name`` (default: the
    server's host) as SNI and checking the certificate against it. Failures are raised as
    :mod:`pooled_proxy.errors` connect errors."""
    if server.tls and ssl_context is None:
        raise UpstreamTlsError(f"no TLS context for {server}")
    try:
        with trio.fail_after(connect_timeout or math.inf):
            family = _address_family(server.host)
            stream: trio.abc.Stream = (
                await trio.open_tcp_stream(server.host, server.port)
                if family is None
                else await _connect_to_address(family, server.host, server.port)
            )
            if ssl_context is not None and server.tls:
                tls = trio.SSLStream(
                    stream,
                    ssl_context,
                    server_hostname=server_name or server.host,
                    https_compatible=True,
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
                stream = tls
    except trio.TooSlowError:
        raise ConnectTimeout(f"connect to {server} timed out after {connect_timeout:g}s") from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise _connect_error(server, exc) from None
    return stream


@functools.lru_cache(maxsize=256)
def _address_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP address, ``None`` for a name to look up."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def _connect_to_address(
    family: socket.AddressFamily, host: str, port: int
) -> trio.SocketStream:
    """A TCP stream to an IP address: what ``trio.open_tcp_stream`` does for one address,
    without the task, nursery and resolver step it spends on trying several in turn."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await trio.lowlevel.checkpoint_if_cancelled()
        error = sock.connect_ex((host, port))
        if error == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if error:
            raise OSError(error, os.strerror(error))
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    except BaseException:
        sock.close()
        raise


def _connect_error(server: ServerAddress, exc: BaseException) -> UpstreamConnectError:
    """A failed connect or TLS handshake, by its RFC 9209 kind."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    # The answer's details say why TLS failed, not with whom: "IP address mismatch,
    # certificate is not valid for '10.0.0.7'" goes on the wire as "IP address mismatch".
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = str(cause.verify_message)
        return UpstreamTlsCertificateError(
            f"TLS with {server}: certificate rejected: {why}",
            client_detail=f"certificate rejected: {why.split(',')[0]}",
        )
    alert = tls_alert(server, exc)
    if alert is not None:
        return alert
    if isinstance(cause, ssl.SSLError):
        why = cause.reason or str(cause)
        return UpstreamTlsError(
            f"TLS handshake with {server} failed: {why}", client_detail=f"handshake failed: {why}"
        )
    return UpstreamConnectError(f"connect to {server} failed: {cause or exc}")


def tls_alert(server: ServerAddress, exc: BaseException) -> UpstreamTlsAlert | None:
    """The TLS alert the server ended the connection with, if ``exc`` (a failed handshake,
    read or write) is one. Under TLS 1.3 a server checks the client's certificate after the
    handshake looked complete to the client: its refusal (``certificate required``, say)
    is read by the first read after the handshake, not by the handshake."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.reason or str(cause)
        if "_ALERT_" in why:
            return UpstreamTlsAlert(
                f"TLS with {server}: the server sent the alert {why}",
                client_detail=f"the server sent the alert {why}",
            )
    return None


def _socket_of(stream: trio.abc.Stream) -> Any:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


class UpstreamConnection:
    """One upstream connection. Used by one exchange at a time; the pool owns it in between."""

    http_version = b"1.1"  # for Via

    def __init__(self, stream: trio.abc.Stream, server: ServerAddress) -> None:
        self.server = server
        self._stream = stream
        self._socket = _socket_of(stream)
        self._http = ClientConnection(max_head_bytes=MAX_RESPONSE_HEAD)
        self.requests_sent = 0
        self.received_bytes = 0  # of the current response, to tell a stale socket from a bad reply
        self.keepalive_expiry: float | None = None  # from the upstream's Keep-Alive header
        self.keepalive_advertised: float | None = None  # its timeout=N, in seconds
        self.connect_time: float | None = None  # seconds it took to open, set by the pool
        # The pool's: when it last went idle, how long it had been idle when last checked out
        # (0 while it has not been reused), and when the reaper checks it is still open.
        self.idle_since = 0.0
        self.idle_age = 0.0
        self.probe_at = math.inf
        self.closed = False
        self.send_failed = False
        self.upgraded = False  # switched protocols (101): a tunnel owns the stream now
        self._event: ClientEvent = NEED_DATA  # read ahead by response_at_hand
        self._wait_first = False  # response_at_hand found nothing: the next read waits first

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.server} requests={self.requests_sent}>"

    # -- state, all sync -------------------------------------------------------------------

    @property
    def trailers(self) -> Headers:
        """The last response's trailers, once it ended."""
        return self._http.trailers

    def is_reusable(self) -> bool:
        return not self.closed and not self.send_failed and self._http.reusable()

    def upstream_ends_connection(self) -> bool:
        """The response completed, but the upstream closes after it (``Connection: close``,
        HTTP/1.0): a normal end of the connection, not a failure."""
        return not self.send_failed and self._http.server_closes()

    def is_readable(self) -> bool:
        """An idle connection that is readable has been closed (or broken) by the upstream."""
        if self.closed or self._socket is None:
            return self.closed
        try:
            readable, _, _ = select.select([self._socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def prepare_reuse(self) -> None:
        self._http.start_next_cycle()

    def close(self) -> None:
        """Close at once, without a TLS goodbye: used for failed, cancelled and expired connections."""
        if self.closed:
            return
        self.closed = True
        if self._socket is not None:
            self._socket.close()

    # -- I/O ---------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        try:
            await fastio.send_all(self._stream, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # Not closed yet: the upstream may have answered early (a 413, say) before closing,
            # and that answer is still waiting in our receive buffer.
            self.send_failed = True
            raise UpstreamClosed(
                f"upstream {self.server} closed while we were sending: {exc}"
            ) from None

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
        """Send the request head; with ``end``, the request is complete: bodiless, or with
        its whole ``body`` (framed by its Content-Length), sent in the same write.
        ``valid_syntax``: every part of the head is known to be in the HTTP grammar."""
        self.requests_sent += 1
        self.received_bytes = 0
        try:
            data = self._http.send_request(
                method, target, headers, body=body, end=end, valid_syntax=valid_syntax
            )
        except Unwritable as exc:
            raise self._unwritable(exc) from None
        await self._send(data)

    def _unwritable(self, exc: Unwritable) -> ProxyInternalError:
        """The codec refuses to write what we asked it to. Never the upstream's fault: the
        request validation (protocol/request_checks.py) should have refused the request first."""
        self.close()
        return ProxyInternalError(f"cannot write the request to {self.server}: {exc}")

    async def send_body(self, chunk: bytes) -> None:
        try:
            data = self._http.send_data(chunk)
        except Unwritable as exc:
            raise self._unwritable(exc) from None
        await self._send(data)

    async def end_body(self) -> None:
        try:
            data = self._http.send_end()
        except Unwritable as exc:
            raise self._unwritable(exc) from None
        # After a Content-Length body there is nothing to send, and no checkpoint either: the
        # upload counts as done in the same step as its last byte went out, even when the
        # upstream's whole answer is already back and the exchange is being wound up.
        if data:
            await self._send(data)

    def _parse_error(self, exc: Violation) -> UpstreamProtocolError | UpstreamClosed:
        self.close()
        if self.received_bytes and not self._http.in_body:
            return UpstreamProtocolError(f"bad response from {self.server}: {exc}")
        return UpstreamClosed(f"upstream {self.server} closed the connection mid-response: {exc}")

    async def _receive(self, deadline: float) -> None:
        """Read the next bytes from the upstream into the codec; ``trio.TooSlowError`` if none
        came by ``deadline``."""
        wait_first, self._wait_first = self._wait_first, False
        try:
            data = await fastio.receive_some(
                self._stream, fastio.MAX_RECEIVE, deadline, wait_first=wait_first
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.close()
            raise tls_alert(self.server, exc) or UpstreamClosed(
                f"upstream {self.server} reset the connection: {exc}",
                client_detail="upstream reset the connection",
            ) from None
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if not data and not self.received_bytes:
            self.close()
            raise UpstreamClosed(
                f"upstream {self.server} closed the connection before responding",
                client_detail="upstream closed the connection before responding",
            )
        self.received_bytes += len(data)
        try:
            self._http.receive_data(data)
        except Violation as exc:
            self.close()
            raise UpstreamProtocolError(f"bad response from {self.server}: {exc}") from None

    def _next_event(self) -> ClientEvent:
        event = self._event
        if event is not NEED_DATA:
            self._event = NEED_DATA
            return event
        try:
            return self._http.next_event()
        except Violation as exc:
            raise self._parse_error(exc) from None

    async def _receive_event(self, deadline: float) -> ClientEvent:
        while True:
            event = self._next_event()
            if event is not NEED_DATA:
                return event
            await self._receive(deadline)

    def response_at_hand(self) -> bool:
        """Whether the next response event (its head, after a request) can be had without
        waiting; reads what the upstream has sent so far, without waiting for more."""
        if self._event is NEED_DATA:
            self._event = self._next_event()
            if self._event is NEED_DATA:
                try:
                    data = fastio.receive_now(self._stream, fastio.MAX_RECEIVE)
                except (trio.ClosedResourceError, OSError) as exc:
                    self.close()
                    raise UpstreamClosed(
                        f"upstream {self.server} reset the connection: {exc}"
                    ) from None
                if data is None:
                    self._wait_first = True
                    return False
                self._feed(data)
                self._event = self._next_event()
        return self._event is not NEED_DATA

    def _restart_keepalive_clock(self) -> None:
        """The upstream's keep-alive timer runs from the end of its response (Node's does), so
        ours restarts there too: a response streamed longer than N must not retire the
        connection the moment it ends."""
        if self.keepalive_advertised is not None:
            self.keepalive_expiry = trio.current_time() + max(
                0.0, self.keepalive_advertised - KEEPALIVE_SAFETY_MARGIN
            )

    async def receive_response_head(self, deadline: float = math.inf) -> ResponseHead:
        """The next response head (a 1xx, or the final one); ``trio.TooSlowError`` if it is
        not complete by ``deadline``."""
        event = await self._receive_event(deadline)
        if isinstance(event, ResponseHead):
            if not event.informational:
                self.keepalive_advertised = keep_alive_timeout(event.headers)
                self._restart_keepalive_clock()
            return event
        self.close()
        raise UpstreamClosed(f"upstream {self.server} closed the connection before a response")

    async def receive_data(self, deadline: float = math.inf) -> bytes | None:
        """The next response body chunk as it arrived, or ``None`` at the end (see
        ``trailers``); ``trio.TooSlowError`` if nothing came by ``deadline``."""
        event = await self._receive_event(deadline)
        if type(event) is bytes:
            return event
        if event is END:
            self._restart_keepalive_clock()
            return None
        self.close()
        raise UpstreamClosed(f"upstream {self.server} closed the connection mid-body")

    def buffered_body(self) -> tuple[bytes, bool]:
        """The response body that already arrived, as far as it can be had without waiting,
        and whether the response ended there (``trailers`` is then set).

        A small response usually arrives whole with its head: the forwarder then sends it
        to the client in one write instead of three.
        """
        try:
            body, ended = self._http.buffered_body()
        except Violation as exc:
            raise self._parse_error(exc) from None
        if ended:
            self._restart_keepalive_clock()
        return body, ended

    def detach(self) -> tuple[trio.abc.Stream, bytes]:
        """After a ``101``: the raw stream and the bytes the upstream sent behind the 101 head.

        The connection is spent (switched protocols, it is never reusable); the caller closes
        it when the tunnel ends.
        """
        self.upgraded = True
        return self._stream, self._http.trailing_data

    @property
    def expects_more_response(self) -> bool:
        return self._http.in_body

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
