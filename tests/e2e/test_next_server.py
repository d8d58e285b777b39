"""The next server: a request whose server fails before anything of the exchange reached the
client, and before the request could have reached the server (or when it can be sent again),
goes on to the upstream's other servers, at most ``next_server_tries`` of them.

Real sockets throughout: ports nothing listens on (refused), a listener whose accept queue is
full (a connect that times out), upstreams that reset the connection after reading the request,
or drop a reused connection seconds into a request (on a MockClock that moves when told).
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import pytest
import trio

from pooled_proxy.config import ServerAddress, UpstreamConfig
from pooled_proxy.exchange import ExchangeRecord
from pooled_proxy.ops.accesslog import AccessLog, combined_line
from pooled_proxy.ops.metrics import ProxyMetrics
from tests.support.faulty_upstream import (
    CrashingUpstream,
    FaultyUpstream,
    refused_port,
    until_blocked,
)
from tests.support.helpers import HOST, H11Client, RunningProxy, make_config, start_proxy
from tests.support.operations import Scrape


class Watched:
    """A proxy on real sockets with its access log (JSON, in memory) and metrics."""

    def __init__(self, running: RunningProxy, log: io.StringIO, metrics: ProxyMetrics) -> None:
        self.running = running
        self._log = log
        self._metrics = metrics

    @classmethod
    async def start(cls, nursery: trio.Nursery, *ports: int, **upstream: Any) -> Watched:
        log, metrics = io.StringIO(), ProxyMetrics()
        running = await start_proxy(
            nursery,
            make_config(*ports, **upstream),
            observers=(metrics.observe, AccessLog(log, "json")),
        )
        return cls(running, log, metrics)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._log.getvalue().splitlines()]

    def next_server_count(self, port: int, reason: str) -> float:
        scrape = Scrape.parse(self._metrics.exposition()[0].decode())
        return scrape.value(
            "pooled_proxy_upstream_next_server_total", server=f"{HOST}:{port}", reason=reason
        )

    def is_up(self, index: int) -> bool:
        return (
            self.running.proxy.forwarder.upstreams["app"].health[index].is_up(trio.current_time())
        )


@contextmanager
def connect_blackhole() -> Iterator[int]:
    """A local port where a connect hangs until it times out: a listener that never accepts,
    with an accept queue of one already taken, so the kernel drops every further SYN."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        with socket.create_connection((HOST, port), timeout=1.0):
            yield port


def failed(*pairs: tuple[int, str]) -> list[dict[str, str]]:
    return [{"server": f"{HOST}:{port}", "error": error} for port, error in pairs]


async def test_two_refusing_servers_of_three_cost_no_502_from_the_first_request(nursery):
    good = FaultyUpstream(mode="ok")
    good_port = await nursery.start(good.serve)
    dead = [await refused_port(), await refused_port()]
    proxy = await Watched.start(nursery, *dead, good_port)  # max_fails = 3 (the default)
    with trio.fail_after(10):
        async with await H11Client.connect(proxy.running.port) as client:
            statuses = [(await client.request("GET", "/ok")).status for _ in range(50)]
    assert statuses == [200] * 50
    assert good.faults["ok"] == 50
    lines = proxy.lines()
    # Round robin starts each of the first three requests on a dead server: it goes on to
    # the next, then the next, until the third failure of each marks it down.
    for line in lines[:3]:
        assert line["upstream_failed"] == failed(
            (dead[0], "connection_refused"), (dead[1], "connection_refused")
        )
        assert line["upstream_server"] == f"{HOST}:{good_port}" and line["error"] is None
    assert all(line["upstream_failed"] == [] for line in lines[3:])
    # Each failed server still counts against its passive health.
    assert not proxy.is_up(0) and not proxy.is_up(1) and proxy.is_up(2)
    assert proxy.next_server_count(dead[0], "connection_refused") == 3
    assert proxy.next_server_count(dead[1], "connection_refused") == 3


async def test_a_connect_timeout_moves_on_to_the_next_server(nursery):
    good = FaultyUpstream(mode="ok")
    good_port = await nursery.start(good.serve)
    refused = await refused_port()
    with connect_blackhole() as hanging:
        proxy = await Watched.start(nursery, hanging, refused, good_port, connect_timeout=0.2)
        with trio.fail_after(5):
            async with await H11Client.connect(proxy.running.port) as client:
                started = trio.current_time()
                reply = await client.request("GET", "/ok")
                waited = trio.current_time() - started
    assert reply.status == 200 and reply.body == b"ok"
    assert waited >= 0.2  # the hanging connect took its whole connect_timeout, then moved on
    [line] = proxy.lines()
    assert line["upstream_failed"] == failed(
        (hanging, "connection_timeout"), (refused, "connection_refused")
    )
    assert line["upstream_server"] == f"{HOST}:{good_port}"
    assert proxy.next_server_count(hanging, "connection_timeout") == 1


@pytest.mark.parametrize("tries", [1, 2])
async def test_next_server_tries_bounds_the_servers_one_request_tries(nursery, tries):
    good = FaultyUpstream(mode="ok")
    good_port = await nursery.start(good.serve)
    dead = [await refused_port() for _ in range(tries)]
    proxy = await Watched.start(nursery, *dead, good_port, next_server_tries=tries)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.running.port) as client:
            reply = await client.request("GET", "/ok")
    assert reply.status == 502
    assert reply.headers[b"proxy-status"] == b"pooled-proxy; error=connection_refused"
    assert good.faults["ok"] == 0  # never reached: the tries were used up
    [line] = proxy.lines()
    assert line["upstream_failed"] == failed(*((port, "connection_refused") for port in dead[:-1]))
    assert line["upstream_server"] == f"{HOST}:{dead[-1]}"


async def send_streamed_post(client: H11Client) -> None:
    """A POST whose body arrives after its head: streamed upstream as it comes, not held."""
    await client.send(
        h11.Request(
            method="POST",
            target="/ok",
            headers=[("host", "test.local"), ("transfer-encoding", "chunked")],
        ),
        h11.Data(data=b"first part;"),
    )
    await trio.sleep(0.05)
    await client.send(h11.Data(data=b"second part"), h11.EndOfMessage())


@pytest.mark.parametrize(
    ("mode", "method", "status", "good_requests"),
    [
        # Dropped before a byte of the response: a GET can be sent again, elsewhere.
        ("reset-before-head", "GET", 200, 1),
        # The body went up as it came: the first server may have acted on it.
        ("reset-before-head", "POST", 502, 0),
        # The server started answering: it took the request, whatever the method.
        ("reset-mid-head", "GET", 502, 0),
        ("reset-mid-head", "POST", 502, 0),
    ],
)
async def test_a_reset_after_the_request_went_up_moves_on_only_when_it_can_be_resent(
    nursery, mode, method, status, good_requests
):
    resetting = FaultyUpstream(mode=mode)
    good = FaultyUpstream(mode="ok")
    resetting_port = await nursery.start(resetting.serve)
    good_port = await nursery.start(good.serve)
    proxy = await Watched.start(nursery, resetting_port, good_port)
    with trio.fail_after(5):
        async with await H11Client.connect(proxy.running.port) as client:
            if method == "POST":
                await send_streamed_post(client)
                reply = await client.read_reply()
            else:
                reply = await client.request("GET", "/ok")
    assert reply.status == status
    assert len(resetting.requests) == 1 and resetting.requests[0].complete
    assert len(good.requests) == good_requests
    [line] = proxy.lines()
    assert line["upstream_failed"] == (
        failed((resetting_port, "http_response_incomplete")) if good_requests else []
    )
    assert line["error"] == (None if status == 200 else "http_response_incomplete")


def test_the_combined_line_lists_every_server_tried_as_nginx_does():
    record = ExchangeRecord(
        start=0.0,
        wall_start=0.0,
        method=b"GET",
        target=b"/",
        protocol=b"HTTP/1.1",
        status=200,
        upstream_server="10.0.0.3:80",
        servers_failed=(
            ("10.0.0.1:80", "connection_refused"),
            ("10.0.0.2:80", "connection_timeout"),
        ),
    )
    assert " upstream=10.0.0.1:80,10.0.0.2:80,10.0.0.3:80 " in combined_line(record)


def test_by_default_a_request_tries_every_server_up_to_three():
    def tries(servers: int, next_server_tries: int | None = None) -> int:
        addresses = tuple(ServerAddress(HOST, 9000 + i) for i in range(servers))
        config = UpstreamConfig(name="app", servers=addresses, next_server_tries=next_server_tries)
        return config.server_tries

    assert [tries(n) for n in (1, 2, 3, 5)] == [1, 2, 3, 3]
    assert (tries(5, 5), tries(2, 5), tries(3, 1)) == (5, 2, 1)


@pytest.mark.parametrize(
    ("reset", "dies_after", "upstream_failed"),
    [(False, 3.0, True), (True, 3.0, True), (False, 0.0, False)],
)
async def test_a_reused_connection_closed_well_into_the_request_moves_on(
    nursery, mock_clock, reset, dies_after, upstream_failed
):
    """A connection reused after 5 s idle, whose server closes (or resets) it 3 s into the
    request: the server failed on it, as if a new connection had been dropped. The request
    goes on to the next server, and it counts against the first one. A close as the request
    went up (within RACE) is still the keep-alive race: replayed, nothing counted. On a
    MockClock that moves only when told: the sockets are real."""
    crashing = CrashingUpstream(reset=reset)
    good = FaultyUpstream(mode="ok")
    crashing_port = await nursery.start(crashing.serve)
    good_port = await nursery.start(good.serve)
    proxy = await Watched.start(nursery, crashing_port, good_port)
    replies = []
    async with await H11Client.connect(proxy.running.port) as client:

        async def work():
            replies.append(await client.request("GET", "/work"))

        for _ in range(2):  # round robin: one connection to each server, left idle
            assert (await client.request("GET", "/warm")).status == 200
        mock_clock.jump(5.0)
        nursery.start_soon(work)
        await until_blocked(lambda: crashing.working == 1)
        mock_clock.jump(dies_after)
        crashing.crash.set()
        await until_blocked(lambda: len(replies) == 1)
    assert replies[0].status == 200 and replies[0].body == b"ok"
    assert len(good.requests) == 2  # the warm-up and the request the first server dropped
    line = proxy.lines()[-1]
    health = proxy.running.proxy.forwarder.upstreams["app"].health[0]
    if upstream_failed:
        assert line["upstream_failed"] == failed((crashing_port, "http_response_incomplete"))
        assert proxy.next_server_count(crashing_port, "http_response_incomplete") == 1
        assert health.recent_failures(trio.current_time()) == 1
        assert line["retried"] is False
    else:
        assert line["upstream_failed"] == [] and line["retried"] is True
        assert health.last_failure is None
    assert crashing.connections == 1


@pytest.mark.parametrize(
    ("reset", "details"),
    [(False, "upstream closed the connection before responding"),
     (True, "upstream reset the connection")],
)  # fmt: skip
async def test_a_request_that_cannot_be_resent_gets_a_502_naming_the_late_close(
    nursery, mock_clock, caplog, reset, details
):
    """A POST (its body held, but not idempotent) on a connection reused after 5 s idle,
    dropped 3 s into the request: not sent again, a 502 that says what the server did, a
    warning, and a failure of the server."""
    crashing = CrashingUpstream(reset=reset)
    port = await nursery.start(crashing.serve)
    # One connection at most: the POST gets the idle one, however long it has been idle.
    proxy = await Watched.start(nursery, port, max_connections=1)
    replies = []
    async with await H11Client.connect(proxy.running.port) as client:

        async def post():
            replies.append(await client.request("POST", "/work", body=b"order=1"))

        assert (await client.request("GET", "/warm")).status == 200
        mock_clock.jump(5.0)
        nursery.start_soon(post)
        await until_blocked(lambda: crashing.working == 1)
        mock_clock.jump(3.0)
        crashing.crash.set()
        await until_blocked(lambda: len(replies) == 1)
    assert replies[0].status == 502
    assert replies[0].headers[b"proxy-status"] == (
        f'pooled-proxy; error=http_response_incomplete; details="{details}"'.encode()
    )
    assert crashing.connections == 1  # never sent again
    assert proxy.lines()[-1]["retried"] is False
    last = proxy.running.proxy.forwarder.upstreams["app"].health[0].last_failure
    assert last is not None and last[1] == "http_response_incomplete"
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "POST /work" in warning.getMessage()


async def test_an_only_server_gets_the_request_again_on_a_new_connection(nursery, mock_clock):
    """The only server drops a reused connection 3 s into a request: the request goes to it
    again, once, on a new connection, not on the other idle one (older still, and as likely
    to be on a worker in the same trouble)."""
    crashing = CrashingUpstream()
    port = await nursery.start(crashing.serve)
    proxy = await Watched.start(nursery, port)
    pool = proxy.running.pool()
    replies = []

    async def request(target: str) -> None:
        async with await H11Client.connect(proxy.running.port) as client:
            replies.append(await client.request("GET", target))

    async with trio.open_nursery() as warm:  # at the same time: two connections
        warm.start_soon(request, "/warm")
        warm.start_soon(request, "/warm")
    assert crashing.connections == 2 and pool.statistics().idle == 2
    mock_clock.jump(5.0)
    nursery.start_soon(request, "/work")
    await until_blocked(lambda: crashing.working == 1)
    mock_clock.jump(3.0)
    crashing.crash.set()
    await until_blocked(lambda: len(replies) == 3)
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert crashing.connections == 3
    assert proxy.running.proxy.forwarder.stale_retries == 0
    assert pool.statistics().idle == 2  # the other idle one was left alone
    line = proxy.lines()[-1]
    assert line["upstream_failed"] == failed((port, "http_response_incomplete"))
    assert line["upstream_server"] == f"{HOST}:{port}"
