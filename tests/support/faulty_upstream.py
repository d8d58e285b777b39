"""A deliberately broken HTTP/1.1 upstream, for fault-injection tests and bench/soak.py.

The first path segment of each request picks its fault (or ``FaultyUpstream(mode=...)``
forces one for every request):

=====================  ===================================================================
``/ok``                a correct keep-alive 200 (``?size=N`` body bytes, ``?chunked=1``,
                       ``?trailers=1``: chunked with two trailer fields, ``?rid=X``: an
                       ``X-Request-ID: X`` of its own)
``/reset-before-head`` reads the request, then resets the connection (TCP RST)
``/close-before-head`` reads the request, then closes (FIN) without answering
``/reset-mid-head``    sends half a response head, then resets
``/reset-mid-body``    sends a head promising 100000 bytes and 1000 of them, then resets
``/half-chunked``      sends a chunked head and two chunks, then closes (FIN)
``/garbage``           answers a line that is not a status line, then waits
``/bad-response``      a response with a smuggling-shaped head (``?kind=``, see BAD_HEADS)
``/extra``             a correct response with a second, unasked-for response glued on
``/hang``              reads the request and never answers
``/hang-mid-body``     sends a head and 10 of 1000 bytes, then goes silent
``/endless``           a chunked body that never ends
``/drip``              a correct response, one byte every ``drip_interval`` seconds
=====================  ===================================================================

Every mode that does not close by itself waits until the proxy closes the connection, so
``connections_open`` going back to zero shows the proxy let go of it. ``CrashingUpstream``
fails on a reused connection when told to. ``refused_port()`` gives a port nothing listens
on. ``connector()`` serves the same faults over in-memory streams, for tests on trio's
MockClock.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qsl, urlsplit

import h11
import trio
import trio.testing

from pooled_proxy.config import ServerAddress
from pooled_proxy.errors import UpstreamConnectError
from pooled_proxy.proxy import Proxy
from pooled_proxy.server.http2 import serve_h2
from pooled_proxy.server.listen import handle_client
from pooled_proxy.upstream.connection import UpstreamConnection
from pooled_proxy.upstream.pool import Connector

RECEIVE_SIZE = 64 * 1024
NET_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

# Response heads an upstream must not get away with: each is a 502 for the client.
BAD_HEADS = {
    "cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 5\r\n\r\nhello",
    "space-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "unknown-te": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
}
TRAILERS = [("grpc-status", "0"), ("x-checksum", "c0ffee")]
SMUGGLED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: yes\r\n\r\nsmuggled"


@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool = False  # the whole request arrived (EndOfMessage)


async def _reset(stream: trio.abc.Stream) -> None:
    """Abort the connection: RST on a TCP socket (SO_LINGER 0), a plain close otherwise."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


async def _wait_for_close(stream: trio.abc.Stream) -> None:
    """Read and discard until the peer closes (or resets) the connection."""
    try:
        while await stream.receive_some(RECEIVE_SIZE):
            pass
    except NET_ERRORS:
        pass


def open_fd_count() -> int:
    """File descriptors this process has open (the proxy under test runs in-process)."""
    return len(os.listdir("/proc/self/fd"))


async def wait_until(
    predicate: Callable[[], bool], *, timeout: float = 2.0, what: str = ""
) -> None:
    """Poll ``predicate`` (real time: sockets close asynchronously) until true, else fail."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
    assert predicate(), f"still not true after {timeout}s: {what or predicate}"


async def refused_port() -> int:
    """A local port with nothing listening: connecting to it is refused."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def memory_client(
    nursery: trio.Nursery, proxy: Proxy, *, lockstep: bool = False, h2: bool = False
) -> trio.abc.HalfCloseableStream:
    """A client connection to ``proxy`` over an in-memory stream (for MockClock tests): the
    proxy side runs the real connection task. ``lockstep`` streams have no buffer at all, so
    a client that stops reading stalls the proxy's writes at once. With ``h2``, a client
    that sends the HTTP/2 preface gets the HTTP/2 front end."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, server = pair()
    h2_handler = serve_h2 if h2 else None
    nursery.start_soon(partial(handle_client, server, proxy, scheme=b"http", h2_handler=h2_handler))
    return client


async def read_until_close(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(RECEIVE_SIZE):
            data += chunk
    except NET_ERRORS:
        pass
    return data


class _MemoryUpstreamConnection(UpstreamConnection):
    """Over a memory stream there is no socket for ``close()`` to close; close the stream."""

    def close(self) -> None:
        super().close()
        stream = self._stream
        assert isinstance(stream, trio.StapledStream)
        stream.send_stream.close()  # type: ignore[attr-defined]
        stream.receive_stream.close()  # type: ignore[attr-defined]


class FaultyUpstream:
    def __init__(
        self,
        *,
        mode: str | None = None,
        drip_interval: float = 0.05,
        endless_chunk: int = 16 * 1024,
    ) -> None:
        self.mode = mode
        self.drip_interval = drip_interval
        self.endless_chunk = endless_chunk
        self.requests: list[SeenRequest] = []
        self.faults: Counter[str] = Counter()
        self.connections_opened = 0
        self.connections_open = 0
        self.connect_attempts = 0  # over memory streams, refused ones included
        self.refusing = mode == "refuse"  # memory connector only: refuse every connect

    # -- serving -------------------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    def connector(self, nursery: trio.Nursery) -> Connector:
        """A pool connector that reaches this upstream over in-memory streams."""

        async def connect(server: ServerAddress) -> UpstreamConnection:
            self.connect_attempts += 1
            await trio.lowlevel.checkpoint()
            if self.refusing:
                raise UpstreamConnectError(f"connect to {server} failed: refused (memory)")
            # Lockstep: no buffer between the two ends, so a fast upstream (``/endless``)
            # waits for the proxy to read, as over TCP, instead of growing memory forever.
            ours, theirs = trio.testing.lockstep_stream_pair()
            nursery.start_soon(self.handle, theirs)
            return _MemoryUpstreamConnection(ours, server)

        return connect

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.connections_opened += 1
        self.connections_open += 1
        try:
            conn = h11.Connection(h11.SERVER)
            while True:
                request = await self._read_request(stream, conn)
                if request is None:
                    return
                path = urlsplit(request.target.decode("latin-1")).path
                mode = self.mode or path.strip("/").split("/", 1)[0] or "ok"
                self.faults[mode] += 1
                keep_going = await self._answer(stream, conn, mode, request)
                if not keep_going:
                    return
                conn.start_next_cycle()
        except NET_ERRORS:
            pass
        finally:
            self.connections_open -= 1
            await trio.aclose_forcefully(stream)

    async def _read_request(
        self, stream: trio.abc.Stream, conn: h11.Connection
    ) -> SeenRequest | None:
        request: SeenRequest | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None  # cut mid-request (the proxy refused the rest of a bad body)
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except NET_ERRORS:
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = SeenRequest(event.method, event.target, list(event.headers), b"")
                self.requests.append(request)
            elif isinstance(event, h11.Data):
                assert request is not None
                request.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                request.complete = True
                return request
            else:
                return None  # ConnectionClosed, or h11 paused on an upgrade

    async def _answer(
        self, stream: trio.abc.Stream, conn: h11.Connection, mode: str, request: SeenRequest
    ) -> bool:
        """Answer one request the way ``mode`` says; False when the connection is done."""
        query = dict(parse_qsl(urlsplit(request.target.decode("latin-1")).query))
        if mode == "reset-before-head":
            await _reset(stream)
        elif mode == "close-before-head":
            await stream.aclose()
        elif mode == "reset-mid-head":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")
            await trio.sleep(0.01)
            await _reset(stream)
        elif mode == "reset-mid-body":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000
            )
            await trio.sleep(0.01)
            await _reset(stream)
        elif mode == "half-chunked":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n"
            )
            await trio.sleep(0.01)
            await stream.aclose()
        elif mode == "garbage":
            await stream.send_all(b"SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")
            await _wait_for_close(stream)
        elif mode == "bad-response":
            await stream.send_all(BAD_HEADS[query.get("kind", "cl-te")])
            await _wait_for_close(stream)
        elif mode == "extra":
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED_RESPONSE
            )
            await _wait_for_close(stream)
        elif mode == "hang":
            await _wait_for_close(stream)
        elif mode == "hang-mid-body":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            await _wait_for_close(stream)
        elif mode == "endless":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (self.endless_chunk, b"e" * self.endless_chunk)
            while True:
                await stream.send_all(chunk)
        elif mode == "drip":
            body = b"dripped"
            data = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            for i in range(len(data)):
                await stream.send_all(data[i : i + 1])
                await trio.sleep(self.drip_interval)
            return False
        else:  # "ok" and anything unknown
            size_text = query.get("size", "2")
            size = min(int(size_text), 10**7) if size_text.isdigit() else 2
            body = b"ok" if size == 2 else b"o" * size
            if query.get("chunked") or query.get("trailers"):
                headers = [("transfer-encoding", "chunked")]
            else:
                headers = [("content-length", str(len(body)))]
            if "rid" in query:
                headers.append(("x-request-id", query["rid"]))
            data = conn.send(
                h11.Response(status_code=200, headers=[*headers, ("x-upstream", "faulty")])
            )
            if request.method != b"HEAD":
                data += conn.send(h11.Data(data=body))
            trailers = TRAILERS if query.get("trailers") else []
            data += conn.send(h11.EndOfMessage(headers=trailers))
            await stream.send_all(data)
            return conn.our_state is h11.DONE and conn.their_state is h11.DONE
        return False


class ProbedUpstream(FaultyUpstream):
    """Answers ``GET /healthz`` as ``health`` says (ok: 200, failing: 503, hang: never);
    any other request as FaultyUpstream's ``/ok``."""

    def __init__(self) -> None:
        super().__init__()
        self.health = "ok"
        self.probes = 0

    @property
    def served(self) -> int:
        """Requests other than probes."""
        return sum(1 for r in self.requests if r.target != b"/healthz")

    async def _answer(
        self, stream: trio.abc.Stream, conn: h11.Connection, mode: str, request: SeenRequest
    ) -> bool:
        if request.target != b"/healthz":
            return await super()._answer(stream, conn, mode, request)
        self.probes += 1
        if self.health == "hang":
            await _wait_for_close(stream)
            return False
        status = 200 if self.health == "ok" else 503
        response = h11.Response(status_code=status, headers=[("content-length", "0")])
        await stream.send_all(conn.send(response) + conn.send(h11.EndOfMessage()))
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE


class CrashingUpstream:
    """Answers the first request of each connection; on a later one it works until ``crash``
    is set, then closes without answering, or resets with ``reset`` (a worker that died on
    the request). For tests on a MockClock that moves only when told: the sockets are real,
    and the crash comes when the test has moved the clock on."""

    def __init__(self, *, reset: bool = False) -> None:
        self.reset = reset
        self.working = 0
        self.crash = trio.Event()
        self.connections = 0
        self.answered = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        answered = False
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.EndOfMessage):
                    if answered:
                        self.working += 1
                        await self.crash.wait()
                        self.working -= 1
                        if self.reset:
                            await _reset(stream)
                        return
                    answered = True
                    self.answered += 1
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                        + conn.send(h11.Data(data=b"ok"))
                        + conn.send(h11.EndOfMessage())
                    )
                    conn.start_next_cycle()


async def until_blocked(predicate: Callable[[], bool]) -> None:
    """Wait for ``predicate`` without moving a MockClock: real I/O, no timer, so the clock
    stands still meanwhile."""
    while not predicate():
        await trio.testing.wait_all_tasks_blocked()
