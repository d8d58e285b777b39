"""What every upstream must survive behind the proxy, as reusable async checks.

They talk to the proxy with real clients (httpx, or h11 by hand) and assert on what arrives.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import httpx
import trio

from tests.support.helpers import H11Client


@dataclass(frozen=True)
class Event:
    n: int
    sent: float  # the upstream's time.time() when it wrote the event
    received: float  # ours when the client got it


def payload(size: int) -> bytes:
    """Random bytes: an echo that reorders, drops or duplicates a chunk cannot match them."""
    return os.urandom(size)


async def post_roundtrip(
    client: httpx.AsyncClient, path: str, body: bytes, *, chunked: bool = False
) -> httpx.Response:
    """POST ``body`` (with Content-Length, or chunked from a generator) and check the echo."""
    if chunked:

        async def pieces():  # type: ignore[no-untyped-def]
            for start in range(0, len(body), 16384):
                yield body[start : start + 16384]

        response = await client.post(path, content=pieces())
    else:
        response = await client.post(path, content=body)
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert len(response.content) == len(body)
    assert response.content == body
    return response


async def read_sse(client: httpx.AsyncClient, path: str) -> list[Event]:
    """Read a whole event stream, stamping each event with when it arrived."""
    events: list[Event] = []
    async with client.stream("GET", path, headers={"accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data.startswith("{"):
                    fields = json.loads(data)
                    events.append(Event(fields["n"], fields["t"], time.time()))
    return events


async def read_lines(client: httpx.AsyncClient, path: str) -> list[Event]:
    """Read a body of JSON lines (``{"n":..,"t":..}``), stamping each as it arrives."""
    events: list[Event] = []
    async with client.stream("GET", path) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.strip():
                fields = json.loads(line)
                events.append(Event(fields["n"], fields["t"], time.time()))
    return events


def assert_live(events: list[Event], count: int) -> None:
    """All ``count`` events, in order, and delivered as they were sent, not all at the end.

    The first event must reach the client before the upstream even wrote the last one: a
    proxy that buffered the stream would deliver nothing until the end.
    """
    assert [e.n for e in events] == list(range(1, count + 1))
    assert events[0].received < events[-1].sent, (
        f"first event arrived {events[0].received - events[-1].sent:+.3f}s after the last was sent"
    )


async def measure_idle_close(
    port: int, target: str = "/", timeout: float = 30.0
) -> tuple[float, bytes | None]:
    """Ask a server directly, then time how long it keeps the idle connection open.

    Returns the seconds from our receipt of the complete response to the server's close, and
    the ``Keep-Alive`` header it advertised.
    """
    with trio.fail_after(timeout):
        async with await H11Client.connect(port) as client:
            reply = await client.request("GET", target)
            assert reply.status == 200
            idle_since = trio.current_time()
            while True:
                try:
                    data = await client.stream.receive_some(65536)
                except trio.BrokenResourceError:  # closed with a reset
                    break
                if not data:
                    break
                raise AssertionError(f"unexpected bytes on an idle connection: {data[:100]!r}")
            return trio.current_time() - idle_since, reply.headers.get(b"keep-alive")


@dataclass
class Lane:
    """Two requests through one proxy with ``gap`` seconds of idleness between them."""

    method: str
    gap: float
    statuses: tuple[int, int] = (0, 0)


async def idle_lane(base_url: str, path: str, lane: Lane, *, body: bytes = b"") -> None:
    """Request, stay idle ``lane.gap`` seconds, request again; record both statuses.

    Each request goes on a fresh client connection to the proxy, so only the proxy's pooled
    upstream connection sits idle through the gap.
    """
    statuses: list[int] = []
    for wait in (0.0, lane.gap):
        await trio.sleep(wait)
        async with httpx.AsyncClient(base_url=base_url) as client:
            response = await client.request(lane.method, path, content=body or None)
        if response.status_code == 200 and body:
            assert response.content == body
        statuses.append(response.status_code)
    lane.statuses = (statuses[0], statuses[1])


def sse_events_from_lines(lines: list[tuple[bytes, float]]) -> list[Event]:
    """The ``data: {"n":..,"t":..}`` events among stamped output lines (curl -N, nghttp)."""
    events = []
    for line, received in lines:
        line = line.strip()
        if line.startswith(b"data:") and line[5:].strip().startswith(b"{"):
            fields = json.loads(line[5:])
            events.append(Event(fields["n"], fields["t"], received))
    return events
