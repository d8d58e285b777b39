"""The pool learns a server's unannounced idle timeout from the idle connections it closes.

The rule itself is pure (IdleCloseLearner); the pool is driven with MockClock over real
socket pairs, the far end playing the server (closing it makes the idle socket readable,
as a server's FIN does); one end-to-end test runs a real upstream that closes idle
connections without announcing it.
"""

from __future__ import annotations

import socket

import h11
import pytest
import trio
import trio.testing

from pooled_proxy.config import ServerAddress, UpstreamConfig
from pooled_proxy.upstream.connection import UpstreamConnection
from pooled_proxy.upstream.idle_close import RECENT, WINDOW, IdleCloseLearner
from pooled_proxy.upstream.pool import UpstreamPool
from tests.support.faulty_upstream import CrashingUpstream, until_blocked
from tests.support.helpers import H11Client, make_config, start_proxy
from tests.support.upstream_connection import finish_exchange

SERVER = ServerAddress("127.0.0.1", 9)


# -- the rule ---------------------------------------------------------------------------------


def test_one_early_close_never_decides_two_agreeing_ones_do():
    learner = IdleCloseLearner()
    assert not learner.record_close(0.01, now=0.0)  # closed early, for some other reason
    assert learner.timeout is None and learner.retire_age(1.0) == float("inf")
    learner.record_close(1.08, now=10.0)
    assert learner.timeout is None  # 0.01 and 1.08 do not agree
    assert learner.record_close(1.0, now=20.0)
    assert learner.timeout == 1.0
    assert learner.retire_age(21.0) == 0.75  # a quarter of a short timeout before it
    learner.record_close(30.0, now=40.0)  # found closed at checkout, long after
    assert learner.timeout == 1.0


def test_closes_seen_at_the_same_moment_are_one_event():
    learner = IdleCloseLearner()
    for age in (0.01, 0.012, 0.4):  # a restart closes every idle connection at once
        learner.record_close(age, now=5.0)
    assert learner.timeout is None


def test_a_longer_survival_withdraws_the_closes_it_contradicts():
    learner = IdleCloseLearner()
    learner.record_close(0.3, now=1.0)
    learner.record_close(0.33, now=2.0)
    assert learner.timeout == 0.3
    assert learner.record_alive(0.5)  # the server kept one 0.5 s after all
    assert learner.timeout is None
    assert not learner.record_alive(0.4)  # nothing new: the common, cheap case


def test_what_was_learned_is_forgotten_after_the_window():
    learner = IdleCloseLearner()
    learner.record_close(5.0, now=0.0)
    learner.record_close(5.2, now=1.0)
    assert learner.retire_age(2.0) == 4.0  # the same second as for Keep-Alive: timeout=5
    assert learner.retire_age(WINDOW + 0.5) == float("inf")
    assert learner.timeout is None


def test_an_unreplayable_request_trusts_what_survived():
    learner = IdleCloseLearner()
    assert learner.unreplayable_limit(0.0) == RECENT
    learner.record_alive(8.0)
    assert learner.unreplayable_limit(0.0) == 7.0
    learner.record_close(2.0, now=1.0)  # the newest evidence wins
    assert learner.unreplayable_limit(1.0) == 1.5
    learner.record_close(2.1, now=2.0)
    assert learner.unreplayable_limit(2.0) == float("inf")  # learned: retired in time anyway


# -- the pool ---------------------------------------------------------------------------------


class SocketPairs:
    """Connections over socket pairs; ``far[i]`` is the server's end of the i-th one."""

    def __init__(self) -> None:
        self.far: list[socket.socket] = []
        self.near: list[socket.socket] = []

    async def __call__(self, server: ServerAddress) -> UpstreamConnection:
        near, far = socket.socketpair()
        self.far.append(far)
        self.near.append(near)
        return UpstreamConnection(trio.SocketStream(trio.socket.from_stdlib_socket(near)), server)

    def close_all(self) -> None:
        for sock in self.far + self.near:
            sock.close()


@pytest.fixture
def pairs():
    pairs = SocketPairs()
    yield pairs
    pairs.close_all()


def make_pool(pairs: SocketPairs) -> UpstreamPool:
    config = UpstreamConfig(name="app", servers=(SERVER,), idle_timeout=60.0)
    return UpstreamPool(SERVER, config, connect=pairs)


async def serve_once(pool: UpstreamPool, *, replayable: bool = True) -> tuple[int, bool]:
    """One exchange: which connection (index of its socket pair) and whether reused."""
    connection, reused = await pool.acquire(replayable=replayable)
    finish_exchange(connection)
    pool.release(connection, reusable=True)
    return pool.statistics().opened - 1 if not reused else -1, reused


async def server_closes_after(pairs: SocketPairs, index: int, seconds: float) -> None:
    await trio.sleep(seconds)
    pairs.far[index].close()


async def test_pool_learns_the_timeout_by_probing_idle_connections(autojump_clock, nursery, pairs):
    pool = make_pool(pairs)
    nursery.start_soon(pool.run_reaper)
    for round_ in range(2):
        await serve_once(pool)
        nursery.start_soon(server_closes_after, pairs, round_, 1.0)  # the server's timeout
        await trio.sleep(2.0)
        assert pool.statistics().idle == 0  # the probe saw the close while it sat idle
    assert pool.statistics().closed == {"stale": 2}
    timeout = pool.learned_idle_timeout
    assert timeout is not None and 1.0 <= timeout <= 1.11  # probes every 10% of the age
    # From now on the pool retires idle connections a quarter before it, for every method.
    await serve_once(pool)
    nursery.start_soon(server_closes_after, pairs, 2, 1.0)
    await trio.sleep(0.9)
    stats = pool.statistics()
    assert stats.idle == 0 and stats.closed.get("learned_timeout") == 1
    assert "stale" not in stats.closed or stats.closed["stale"] == 2


async def test_unreplayable_request_takes_a_fresh_connection_until_learned(
    autojump_clock, nursery, pairs
):
    pool = make_pool(pairs)
    nursery.start_soon(pool.run_reaper)
    await serve_once(pool)
    await trio.sleep(RECENT / 2)
    _, reused = await serve_once(pool, replayable=False)
    assert reused  # used a moment ago: the most recently used one is taken
    await trio.sleep(0.9)
    _, reused = await serve_once(pool, replayable=False)
    assert not reused and pool.statistics().opened == 2  # idle too long to trust: fresh
    _, reused = await serve_once(pool)
    assert reused  # a request that can be replayed still takes the pooled one


async def test_a_server_with_a_long_timeout_keeps_its_connections(autojump_clock, nursery, pairs):
    pool = make_pool(pairs)
    nursery.start_soon(pool.run_reaper)
    await serve_once(pool)
    await trio.sleep(59.0)  # idle_timeout is 60 s; the server never closes it
    stats = pool.statistics()
    assert stats.idle == 1 and stats.closed == {}
    _, reused = await serve_once(pool)
    assert reused
    # The probes saw it survive ~58 s, so a request that cannot be replayed reuses a
    # connection idle for less than that too.
    await trio.sleep(30.0)
    _, reused = await serve_once(pool, replayable=False)
    assert reused and pool.statistics().opened == 1
    assert pool.learned_idle_timeout is None
    await trio.sleep(61.0)
    assert pool.statistics().closed == {"idle_timeout": 1}


async def test_a_connection_handed_to_a_waiting_request_is_sent_on_from_the_handoff(
    mock_clock, nursery, pairs
):
    """A connection that goes from one exchange straight to a request waiting for it is
    checked out then, idle 0 s: a close 0.1 s later is the race, one 1 s later is not, however
    long ago the connection was last idle."""
    config = UpstreamConfig(name="app", servers=(SERVER,), idle_timeout=60.0, max_connections=1)
    pool = UpstreamPool(SERVER, config, connect=pairs)
    await serve_once(pool)  # idle from 0 s
    mock_clock.jump(10.0)
    first, reused = await pool.acquire()
    assert reused
    finish_exchange(first)
    handed = []

    async def wait() -> None:
        handed.append(await pool.acquire())

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    mock_clock.jump(5.0)
    pool.release(first, reusable=True)
    await trio.testing.wait_all_tasks_blocked()
    assert handed == [(first, True)]
    mock_clock.jump(0.1)
    assert pool.closed_under_us(first)
    mock_clock.jump(1.0)
    assert not pool.closed_under_us(first)
    pool.release(first, reusable=False)


# -- end to end ---------------------------------------------------------------------------------


class IdleClosingUpstream:
    """Echoes each request's body length; closes a connection idle ``idle`` seconds without
    announcing it (no Keep-Alive header), as uvicorn and many others do."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.connections = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        received = 0
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    timeout = self.idle if conn.our_state is h11.IDLE else 5.0
                    with trio.move_on_after(timeout):
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                        continue
                    return  # idle too long: close without a word
                if isinstance(event, h11.Data):
                    received += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    body = b"%d" % received
                    await stream.send_all(
                        conn.send(
                            h11.Response(
                                status_code=200, headers=[("content-length", str(len(body)))]
                            )
                        )
                        + conn.send(h11.Data(data=body))
                        + conn.send(h11.EndOfMessage())
                    )
                    conn.start_next_cycle()
                    received = 0


async def post(port: int, body: bytes) -> int:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(
            b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        reply = b""
        while data := await stream.receive_some(65536):
            reply += data
    return int(reply.split(b" ", 2)[1])


async def test_posts_around_an_unannounced_idle_close_never_get_a_502(nursery):
    upstream = IdleClosingUpstream(idle=0.25)
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    pool = proxy.pool()
    statuses = []
    with trio.fail_after(10):
        # Gaps just under and over the server's timeout: before the pool has learned it, a
        # POST after such a gap gets a fresh connection; the probes see the closes.
        for gap in (0.0, 0.24, 0.35, 0.24, 0.35):
            await trio.sleep(gap)
            statuses.append(await post(proxy.port, b"x" * 100))
        learned = pool.learned_idle_timeout
        assert learned is not None and 0.2 <= learned <= 0.4, pool.statistics()
        # Learned: the idle connection is retired before the server closes it.
        await trio.sleep(0.24)
        statuses.append(await post(proxy.port, b"x" * 100))
    assert statuses == [200] * 6
    stats = pool.statistics()
    assert stats.closed.get("learned_timeout", 0) >= 1, stats
    assert proxy.proxy.forwarder.stale_retries == 0


@pytest.mark.parametrize(
    ("dies_after", "learned", "stale_retries", "failure"),
    [(3.0, None, 0, "http_response_incomplete"), (0.0, 5.0, 2, None)],
)
async def test_a_close_long_after_the_request_is_not_an_idle_close(
    nursery, mock_clock, dies_after, learned, stale_retries, failure
):
    """Twice, a connection idle 5 s is reused and the server dies 3 s into the request: the
    server failed (it counts against its health) and the request goes to it again on a new
    connection, its only server; the pool learns no 5 s idle timeout from it (it would
    retire its connections after 4 s from then on). A close as the request went up is the
    keep-alive race: replayed as stale, not counted, and it teaches the timeout. On a
    MockClock that moves only when told: the sockets are real."""
    upstream = CrashingUpstream()
    port = await nursery.start(upstream.serve)
    proxy = await start_proxy(nursery, make_config(port))
    pool = proxy.pool()

    replies = []
    async with await H11Client.connect(proxy.port) as client:

        async def work():
            replies.append((await client.request("GET", "/work")).status)

        assert (await client.request("GET", "/warm")).status == 200
        for round_ in range(2):
            mock_clock.jump(5.0)
            nursery.start_soon(work)
            await until_blocked(lambda: upstream.working == 1)
            mock_clock.jump(dies_after)
            upstream.crash.set()
            await until_blocked(lambda round_=round_: len(replies) == round_ + 1)
            upstream.crash = trio.Event()
    assert replies == [200, 200]
    assert upstream.connections == 3  # each replay went up on a new connection
    assert proxy.proxy.forwarder.stale_retries == stale_retries
    health = proxy.proxy.forwarder.upstreams["app"].health[0]
    # (The replay's success then cleared the count of failures: the last one stays.)
    assert (health.last_failure and health.last_failure[1]) == failure
    assert pool.learned_idle_timeout == learned
