"""An upstream that answers the first request on each connection and drops the second."""

from __future__ import annotations

import socket

import h11
import trio
import trio.testing


class OneShotUpstream:
    """Answers the first request on each connection, keeps the connection open, and closes it
    without answering when a second request arrives: the stale-connection race, every time."""

    def __init__(self, *, close_idle_after: float | None = None) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.close_idle_after = close_idle_after

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            answered = False
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if answered and self.close_idle_after is not None:
                        await trio.sleep(self.close_idle_after)
                        return
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    if answered:
                        # A second request on this connection: drop it on the floor.
                        stream.socket.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                        )
                        return
                    self.requests.append(event.method + b" " + event.target)
                if isinstance(event, h11.EndOfMessage):
                    body = b"ok"
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    answered = True
                    conn.start_next_cycle()
