"""Shared test tools: configs, a running proxy on 127.0.0.1:0, and a hand-written h11 client."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Self

import h11
import trio

from pooled_proxy.config import (
    Config,
    RouteConfig,
    ServerAddress,
    ServerConfig,
    UpstreamConfig,
)
from pooled_proxy.daemon.lifecycle import serve
from pooled_proxy.proxy import Proxy

HOST = "127.0.0.1"


def make_config(*ports: int, server: dict[str, Any] | None = None, **upstream: Any) -> Config:
    """One upstream "app" on the given local ports, routed from "/", proxy on port 0."""
    app = UpstreamConfig(
        name="app", servers=tuple(ServerAddress(HOST, port) for port in ports), **upstream
    )
    return Config(
        server=ServerConfig(listen=(ServerAddress(HOST, 0),), **(server or {})),
        upstreams={"app": app},
        routes=(RouteConfig(upstream="app"),),
    )


@dataclass
class RunningProxy:
    proxy: Proxy
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pool(self, upstream: str = "app", index: int = 0):  # type: ignore[no-untyped-def]
        return self.proxy.forwarder.upstreams[upstream].pools[index]


async def start_proxy(nursery: trio.Nursery, config: Config, **proxy_kwargs: Any) -> RunningProxy:
    proxy = Proxy(config, **proxy_kwargs)
    addresses = await nursery.start(serve, proxy)
    return RunningProxy(proxy, addresses[0].port)


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    header_list: list[tuple[bytes, bytes]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class H11Client:
    """A keep-alive HTTP/1.1 client on one real TCP connection, written with h11 by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> H11Client:
        return cls(await trio.open_tcp_stream(HOST, port))

    async def send(self, *events: Any) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) or b"" for e in events))

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return event

    async def read_reply(self) -> Reply:
        event = await self.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await self.next_event()
        assert isinstance(event, h11.Response), event
        body = b""
        while True:
            part = await self.next_event()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise AssertionError(part)
        headers = list(event.headers)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return Reply(event.status_code, dict(headers), body, headers)

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
    ) -> Reply:
        all_headers = [("host", "test.local"), *(headers or [])]
        if body:
            all_headers.append(("content-length", str(len(body))))
        events: list[Any] = [h11.Request(method=method, target=target, headers=all_headers)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        await self.send(*events)
        return await self.read_reply()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes the connection."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
            if not read_until_close:
                break
        return received


# A client storm in a process of its own (as wrk is: not paced by the proxy's event loop, nor
# by the test's GIL): connect again and again (each connection reset at once, so neither side
# runs out of file descriptors or ports) until a connect is refused or ``seconds`` pass. It
# prints "started" after its first connections, then how it ended.
_STORM = """
import errno, socket, struct, sys, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
count, outcome = 0, "timeout"
while time.monotonic() < end:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        sock.connect(("127.0.0.1", port))
    except OSError as exc:
        refused = exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET)
        outcome = "refused" if refused else errno.errorcode.get(exc.errno, str(exc))
        break
    finally:
        sock.close()
    count += 1
    if count == 50:
        print("started", flush=True)
print(outcome, count, flush=True)
"""


@dataclass
class Storm:
    process: trio.Process
    _pending: bytes = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._pending:
            chunk = await self.process.stdout.receive_some(100)
            if not chunk:
                break
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    async def started(self) -> None:
        assert await self.line() == "started"

    async def outcome(self) -> str:
        """ "refused", "timeout" or an errno name, once the storm ended."""
        return (await self.line()).split()[0]


@asynccontextmanager
async def connection_storm(port: int, *, seconds: float = 10.0) -> AsyncIterator[Storm]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _STORM, str(port), str(seconds)], stdout=subprocess.PIPE
    )
    try:
        yield Storm(process)
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


def sse_request(target: str) -> h11.Request:
    return h11.Request(
        method="GET",
        target=target,
        headers=[("host", "a"), ("accept", "text/event-stream"), ("accept-encoding", "gzip")],
    )


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.005)


def two_upstreams(
    app: tuple[int, ...], other: tuple[int, ...], other_prefix: str = "/other/", **app_settings: Any
) -> Config:
    """``other_prefix`` goes to upstream "other" (stripped), the rest to "app"."""
    return Config(
        server=ServerConfig(listen=(ServerAddress(HOST, 0),)),
        upstreams={
            "app": UpstreamConfig(
                name="app", servers=tuple(ServerAddress(HOST, p) for p in app), **app_settings
            ),
            "other": UpstreamConfig(
                name="other", servers=tuple(ServerAddress(HOST, p) for p in other)
            ),
        },
        routes=(
            RouteConfig(upstream="other", path_prefix=other_prefix, strip_prefix=True),
            RouteConfig(upstream="app"),
        ),
    )
