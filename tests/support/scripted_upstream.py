"""An upstream that answers with bytes written by hand, piece by piece, and records each
request head per connection."""

from __future__ import annotations

import re

import h11
import trio

from tests.support.helpers import HOST, make_config, start_proxy

CLOSE = None  # in a script: the upstream closes the connection there
# A trio.Event in a script: the upstream waits there until the test sets it.


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class ScriptedUpstream:
    """Answers a request for ``/name`` with ``script["/name"]``, piece by piece."""

    def __init__(self, script: dict[str, list[bytes | trio.Event | None]]) -> None:
        self.script = {"/ok": [OK], **script}
        self.requests: list[list[bytes]] = []  # raw request heads, per connection
        self.ended_by_proxy: list[int] = []  # connections the proxy closed

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        index = len(self.requests)
        self.requests.append([])
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        data = b""
                    if not data:
                        self.ended_by_proxy.append(index)
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                length = int(match.group(1)) if match else 0
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                body, buffer = buffer[:length], buffer[length:]
                self.requests[index].append(head + b"\r\n\r\n" + body)
                path = head.split(b" ")[1].partition(b"?")[0].decode()
                for piece in self.script[path]:
                    if piece is CLOSE:
                        return
                    if isinstance(piece, trio.Event):
                        await piece.wait()
                        continue
                    await stream.send_all(piece)
                    await trio.sleep(0.01)  # so the proxy reads the next piece on its own


async def run(nursery: trio.Nursery, script: dict[str, list[bytes | None]]):  # type: ignore[no-untyped-def]
    upstream = ScriptedUpstream(script)
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(
        nursery, make_config(port, response_header_timeout=1.0, read_timeout=1.0)
    )
    return upstream, proxy


def as_h11_writes_it(raw: bytes) -> bytes:
    """Parse a request head and write it again with h11, names as they came."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    request = server.next_event()
    assert isinstance(request, h11.Request), request
    client = h11.Connection(h11.CLIENT)
    headers = list(request.headers.raw_items())
    return client.send(h11.Request(method=request.method, target=request.target, headers=headers))
