"""UpstreamPool and PoolState: bounds, idle expiry, the wait queue, cancellation safety.

Driven with trio's MockClock over in-memory streams, so every timeout runs instantly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pooled_proxy.config import ServerAddress, UpstreamConfig
from pooled_proxy.errors import PoolTimeout
from pooled_proxy.upstream.connection import UpstreamConnection
from pooled_proxy.upstream.pool import WATCH_AFTER, PoolState, UpstreamPool, Waiter
from tests.support.upstream_connection import finish_exchange

SERVER = ServerAddress("127.0.0.1", 9)


class Connector:
    """Hands out UpstreamConnections over memory streams and remembers the far ends."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.opened: list[UpstreamConnection] = []

    async def __call__(self, server: ServerAddress) -> UpstreamConnection:
        await trio.sleep(self.delay)
        near, _far = trio.testing.memory_stream_pair()
        connection = UpstreamConnection(near, server)
        self.opened.append(connection)
        return connection


def make_pool(connector: Connector, **limits: object) -> UpstreamPool:
    config = UpstreamConfig(name="app", servers=(SERVER,), **limits)  # type: ignore[arg-type]
    return UpstreamPool(SERVER, config, connect=connector)


async def test_idle_connection_is_reused_lifo(autojump_clock):
    connector = Connector()
    pool = make_pool(connector)
    first, reused = await pool.acquire()
    second, _ = await pool.acquire()
    assert not reused
    for connection in (first, second):
        finish_exchange(connection)
    pool.release(first, reusable=True)
    pool.release(second, reusable=True)
    again, reused = await pool.acquire()
    assert reused and again is second  # most recently used first
    assert pool.statistics().idle == 1 and pool.statistics().in_use == 1


async def test_reaper_closes_idle_connections_after_idle_timeout(autojump_clock, nursery):
    connector = Connector()
    pool = make_pool(connector, idle_timeout=60.0)
    nursery.start_soon(pool.run_reaper)
    connection, _ = await pool.acquire()
    finish_exchange(connection)
    pool.release(connection, reusable=True)
    await trio.sleep(59)
    assert pool.statistics().idle == 1 and not connection.closed
    await trio.sleep(2)
    stats = pool.statistics()
    assert stats.idle == 0 and connection.closed
    assert stats.closed == {"idle_timeout": 1}
    fresh, reused = await pool.acquire()
    assert not reused and fresh is not connection


async def test_upstream_keepalive_hint_retires_connection_early(autojump_clock, nursery):
    connector = Connector()
    pool = make_pool(connector, idle_timeout=60.0)
    nursery.start_soon(pool.run_reaper)
    connection, _ = await pool.acquire()
    finish_exchange(connection)
    connection.keepalive_expiry = trio.current_time() + 4.0  # upstream said timeout=5
    pool.release(connection, reusable=True)
    await trio.sleep(4.5)
    assert connection.closed
    assert pool.statistics().closed == {"keepalive_timeout": 1}


async def test_max_idle_closes_the_surplus(autojump_clock):
    connector = Connector()
    pool = make_pool(connector, max_idle=1)
    a, _ = await pool.acquire()
    b, _ = await pool.acquire()
    finish_exchange(a)
    finish_exchange(b)
    pool.release(a, reusable=True)
    pool.release(b, reusable=True)
    stats = pool.statistics()
    assert stats.idle == 1 and stats.closed == {"max_idle": 1} and b.closed


async def test_unreusable_connection_is_closed_not_pooled(autojump_clock):
    pool = make_pool(Connector())
    connection, _ = await pool.acquire()
    pool.release(connection, reusable=True)  # exchange never completed: h11 says no
    assert connection.closed and pool.statistics().idle == 0
    assert pool.statistics().closed == {"error": 1}


async def test_max_requests_per_connection(autojump_clock):
    pool = make_pool(Connector(), max_requests_per_connection=1)
    connection, _ = await pool.acquire()
    finish_exchange(connection)
    connection.requests_sent = 1
    pool.release(connection, reusable=True)
    assert connection.closed and pool.statistics().closed == {"max_requests": 1}


async def test_waiter_gets_released_connection_in_fifo_order(autojump_clock, nursery):
    pool = make_pool(Connector(), max_connections=1, queue_timeout=30.0)
    held, _ = await pool.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        connection, reused = await pool.acquire()
        order.append(i)
        assert reused and connection is held
        finish_exchange(connection)
        pool.release(connection, reusable=True)

    for i in range(3):
        nursery.start_soon(wait, i)
        await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics().waiting == 3
    finish_exchange(held)
    pool.release(held, reusable=True)
    await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2]
    assert pool.statistics().in_use == 0 and pool.statistics().opened == 1


async def test_queue_timeout_raises_pool_timeout(autojump_clock, nursery):
    pool = make_pool(Connector(), max_connections=1, queue_timeout=5.0)
    nursery.start_soon(pool.run_reaper)  # it times the queue out
    await pool.acquire()
    start = trio.current_time()
    with pytest.raises(PoolTimeout):
        await pool.acquire()
    assert trio.current_time() - start == pytest.approx(5.0)
    stats = pool.statistics()
    assert stats.waiting == 0 and stats.queue_timeouts == 1


async def test_each_waiter_times_out_queue_timeout_after_it_queued(autojump_clock, nursery):
    # One timer (the reaper's) for the whole queue: after the head times out it must wake
    # again for the next waiter's deadline, and a cancelled waiter in the middle leaves no gap.
    pool = make_pool(Connector(), max_connections=1, queue_timeout=5.0)
    nursery.start_soon(pool.run_reaper)
    await pool.acquire()
    timed_out: list[tuple[int, float, float]] = []

    async def wait(i: int) -> None:
        queued = trio.current_time()
        with pytest.raises(PoolTimeout, match="queue_timeout"):
            await pool.acquire()
        timed_out.append((i, queued, trio.current_time()))

    with trio.fail_after(60):  # virtual seconds: a waiter left asleep fails the test
        async with trio.open_nursery() as waiters:
            for i in range(3):
                waiters.start_soon(wait, i)
                await trio.sleep(1.5)
            async with trio.open_nursery() as cancelled:
                cancelled.start_soon(wait, 3)
                await trio.sleep(0.5)
                cancelled.cancel_scope.cancel()
            waiters.start_soon(wait, 4)
    assert [i for i, _, _ in timed_out] == [0, 1, 2, 4]
    assert [end - queued for _, queued, end in timed_out] == pytest.approx([5.0] * 4)
    stats = pool.statistics()
    assert (stats.waiting, stats.queue_timeouts, stats.queue_waits) == (0, 4, 5)


async def test_a_cancelled_waiter_in_the_middle_leaves_the_order_intact(autojump_clock, nursery):
    pool = make_pool(Connector(), max_connections=1, queue_timeout=30.0)
    nursery.start_soon(pool.run_reaper)
    held, _ = await pool.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        connection, _ = await pool.acquire()
        order.append(i)
        await trio.sleep(1)
        finish_exchange(connection)
        pool.release(connection, reusable=True)

    scopes = []
    for i in range(3):
        scope = trio.CancelScope()
        scopes.append(scope)

        async def in_scope(i: int = i, scope: trio.CancelScope = scope) -> None:
            with scope:
                await wait(i)

        nursery.start_soon(in_scope)
        await trio.testing.wait_all_tasks_blocked()
    scopes[1].cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics().waiting == 2
    finish_exchange(held)
    pool.release(held, reusable=True)
    await trio.sleep(5)
    assert order == [0, 2]
    assert pool.statistics().in_use == 0 and pool.statistics().idle == 1


async def test_a_stopped_reaper_leaves_nobody_waiting(autojump_clock, nursery):
    pool = make_pool(Connector(), max_connections=1, queue_timeout=30.0)
    await pool.acquire()
    failed: list[float] = []

    async def wait() -> None:
        with pytest.raises(PoolTimeout):
            await pool.acquire()
        failed.append(trio.current_time())

    async with trio.open_nursery() as reaper:
        reaper.start_soon(pool.run_reaper)
        nursery.start_soon(wait)
        await trio.sleep(1)
        reaper.cancel_scope.cancel()
    await trio.sleep(60)
    assert failed == [pytest.approx(1.0)]
    assert pool.statistics().waiting == 0


async def test_on_wait_comes_before_a_connect_and_only_for_a_wait_in_the_queue_that_lasts(
    autojump_clock, nursery
):
    # on_wait starts watching the client: a request that is handed a connection within
    # WATCH_AFTER of joining the queue never needs it.
    pool = make_pool(Connector(delay=1.0), max_connections=1, queue_timeout=30.0)
    nursery.start_soon(pool.run_reaper)
    called: list[tuple[str, float]] = []
    got: list[str] = []

    def on_wait(name: str) -> Callable[[], None]:
        return lambda: called.append((name, trio.current_time()))

    held, _ = await pool.acquire(on_wait=on_wait("connect"))
    assert called == [("connect", 0.0)]  # before the connect's wait

    async def wait(name: str, hold: float) -> None:
        connection, _ = await pool.acquire(on_wait=on_wait(name))
        got.append(name)
        await trio.sleep(hold)
        finish_exchange(connection)
        pool.release(connection, reusable=True)

    nursery.start_soon(wait, "short", 2.0)
    await trio.sleep(WATCH_AFTER / 2)
    nursery.start_soon(wait, "long", 0.0)
    await trio.sleep(WATCH_AFTER / 4)
    finish_exchange(held)
    pool.release(held, reusable=True)  # to "short", within WATCH_AFTER
    await trio.sleep(5)
    assert got == ["short", "long"]
    queued = 1.0 + WATCH_AFTER / 2  # when "long" joined the queue
    assert called == [("connect", 0.0), ("long", pytest.approx(queued + WATCH_AFTER))]


async def test_full_queue_rejects_at_once(autojump_clock, nursery):
    pool = make_pool(Connector(), max_connections=1, queue_size=2, queue_timeout=30.0)
    await pool.acquire()
    for _ in range(2):
        nursery.start_soon(pool.acquire)
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    with pytest.raises(PoolTimeout, match="full"):
        await pool.acquire()
    assert trio.current_time() == start
    assert pool.statistics().queue_rejected == 1


async def test_freed_capacity_lets_a_waiter_connect(autojump_clock, nursery):
    connector = Connector()
    pool = make_pool(connector, max_connections=1, queue_timeout=30.0)
    held, _ = await pool.acquire()
    got: list[bool] = []

    async def wait() -> None:
        _, reused = await pool.acquire()
        got.append(reused)

    nursery.start_soon(wait)
    await trio.testing.wait_all_tasks_blocked()
    pool.release(held, reusable=False)  # broken: closed, its slot goes to the waiter
    await trio.testing.wait_all_tasks_blocked()
    assert got == [False] and len(connector.opened) == 2
    stats = pool.statistics()
    assert stats.in_use == 1 and stats.connecting == 0


async def test_cancelled_waiter_leaves_the_queue(autojump_clock):
    pool = make_pool(Connector(), max_connections=1, queue_timeout=30.0)
    held, _ = await pool.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.acquire)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().waiting == 1
        nursery.cancel_scope.cancel()
    assert pool.statistics().waiting == 0
    finish_exchange(held)
    pool.release(held, reusable=True)  # nobody waits any more: it goes idle
    stats = pool.statistics()
    assert stats.in_use == 0 and stats.idle == 1


async def test_cancelled_connect_frees_its_slot(autojump_clock):
    pool = make_pool(Connector(delay=10), max_connections=1)
    with trio.move_on_after(1):
        await pool.acquire()
    stats = pool.statistics()
    assert stats.connecting == 0 and stats.in_use == 0
    connection, _ = await pool.acquire()  # the slot is usable again
    assert connection is not None


async def test_close_drains_pool(autojump_clock):
    pool = make_pool(Connector())
    a, _ = await pool.acquire()
    b, _ = await pool.acquire()
    finish_exchange(a)
    finish_exchange(b)
    pool.release(a, reusable=True)
    pool.close()
    assert a.closed
    pool.release(b, reusable=True)
    assert b.closed
    assert pool.statistics().closed == {"drain": 2}


class FakeConnection:
    requests_sent = 0
    keepalive_expiry = None
    keepalive_advertised = None

    def __init__(self) -> None:
        self.closed = False
        self.server_closed = False  # the server closed it (an idle socket turns readable)
        self.idle_since = 0.0
        self.idle_age = 0.0
        self.probe_at = math.inf

    def close(self) -> None:
        self.closed = True

    def is_readable(self) -> bool:
        return self.server_closed or self.closed


class PoolStateMachine(RuleBasedStateMachine):
    """Random acquire/connect/release/queue/cancel/expire/server-close sequences, driven the
    way UpstreamPool drives PoolState, never break the pool's bounds or lose a waiter.

    A queued request is modelled until it wakes up: handed a connection or a connect slot
    (``handed``), it may still be cancelled before it runs, as a timed-out waiter is.
    """

    QUEUE_SIZE = 3

    def __init__(self) -> None:
        super().__init__()
        self.state: PoolState[FakeConnection] = PoolState(
            max_connections=3, max_idle=2, idle_timeout=10.0
        )
        self.now = 0.0
        self.leased: list[FakeConnection] = []
        self.opening = 0  # connects under way (each holds a slot in ``connecting``)
        self.queued: list[Waiter[FakeConnection]] = []  # still in the pool's queue
        self.handed: list[Waiter[FakeConnection]] = []  # given a connection or a slot, not awake

    def _close(self, dead: list[tuple[FakeConnection, str]]) -> None:
        for connection, _ in dead:
            assert not connection.closed
            connection.close()
        self._grant()

    def _grant(self) -> None:
        waiter = self.state.grant_capacity()
        if waiter is not None:
            assert waiter.may_connect and waiter.connection is None
            self.queued.remove(waiter)
            self.handed.append(waiter)

    @rule(replayable=st.booleans())
    def acquire(self, replayable: bool) -> None:
        connection, dead = self.state.take_idle(self.now, replayable=replayable)
        self._close(dead)
        if connection is not None:
            assert not connection.closed and not connection.server_closed
            self.leased.append(connection)
        elif self.state.can_open():
            self.state.connecting += 1
            self.opening += 1
        elif len(self.state.waiters) < self.QUEUE_SIZE:
            waiter: Waiter[FakeConnection] = Waiter()
            self.state.waiters.append(waiter)
            self.queued.append(waiter)

    @precondition(lambda self: self.opening)
    @rule(succeeds=st.booleans())
    def connect_ends(self, succeeds: bool) -> None:
        self.opening -= 1
        self.state.connecting -= 1
        if succeeds:
            self.state.in_use += 1
            self.leased.append(FakeConnection())
        else:
            self._grant()

    @precondition(lambda self: self.leased)
    @rule(data=st.data(), reusable=st.booleans())
    def release(self, data: st.DataObject, reusable: bool) -> None:
        self._release(data.draw(st.integers(0, len(self.leased) - 1)), reusable)

    def _release(self, index: int, reusable: bool) -> None:
        connection = self.leased.pop(index)
        self.state.in_use -= 1
        if reusable:
            waiter, reason = self.state.put_back(connection, self.now)
            if waiter is not None:
                assert reason is None and waiter.connection is connection
                self.queued.remove(waiter)
                self.handed.append(waiter)
                return
            if reason is None:
                return
        self._close([(connection, "error")])

    @precondition(lambda self: self.handed)
    @rule(data=st.data(), cancelled=st.booleans())
    def waiter_wakes(self, data: st.DataObject, cancelled: bool) -> None:
        waiter = self.handed.pop(data.draw(st.integers(0, len(self.handed) - 1)))
        if waiter.connection is not None:
            connection, waiter.connection = waiter.connection, None
            self.leased.append(connection)
            if cancelled:  # gave up at the same moment: the connection goes back
                self._release(len(self.leased) - 1, reusable=True)
        elif not cancelled:
            self.opening += 1  # its slot is already counted in ``connecting``
        else:
            self.state.connecting -= 1
            self._grant()

    @precondition(lambda self: self.queued)
    @rule(data=st.data())
    def waiter_times_out(self, data: st.DataObject) -> None:
        waiter = self.queued.pop(data.draw(st.integers(0, len(self.queued) - 1)))
        self.state.waiters.remove(waiter)

    @precondition(lambda self: self.state.idle)
    @rule(data=st.data())
    def server_closes_an_idle_one(self, data: st.DataObject) -> None:
        connection, _ = self.state.idle[data.draw(st.integers(0, len(self.state.idle) - 1))]
        connection.server_closed = True

    @rule(seconds=st.floats(0, 20))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._close(self.state.expire(self.now) + self.state.probe(self.now))

    @invariant()
    def bounded(self) -> None:
        state = self.state
        assert state.total <= state.max_connections
        assert len(state.idle) <= state.max_idle
        assert len(state.waiters) <= self.QUEUE_SIZE
        handed_connections = sum(w.connection is not None for w in self.handed)
        assert state.in_use == len(self.leased) + handed_connections
        assert state.connecting == self.opening + len(self.handed) - handed_connections
        assert list(state.waiters) == self.queued  # FIFO, none lost, none twice
        assert all(not c.closed for c, _ in state.idle)
        assert all(expires > self.now for _, expires in state.idle)
        assert all(expires <= c.idle_since + state.idle_timeout for c, expires in state.idle)
        # Nobody waits while a connection is idle or a slot is free.
        assert not state.waiters or (not state.idle and not state.can_open())


TestPoolStateMachine = PoolStateMachine.TestCase
TestPoolStateMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


async def test_upstream_connection_close_is_counted_as_upstream_close_not_error(autojump_clock):
    pool = make_pool(Connector())
    connection, _ = await pool.acquire()
    finish_exchange(
        connection, b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    pool.release(connection, reusable=True)  # a complete exchange the upstream ended
    assert connection.closed and pool.statistics().idle == 0
    assert pool.statistics().closed == {"upstream_close": 1}
