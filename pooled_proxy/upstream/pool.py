"""A bounded pool of keep-alive connections to one upstream server.

``PoolState`` is the pure bookkeeping (no trio, no sockets): capacity, the idle LIFO stack,
the FIFO wait queue. ``UpstreamPool`` is the trio shell that opens, hands out, reaps and
closes connections, deciding everything through ``PoolState`` first and doing the I/O after.

Invariants (checked by a hypothesis state machine in the tests):
``in_use + connecting + len(idle) <= max_connections`` and ``len(idle) <= max_idle``.

Each pool also learns its server's unannounced idle timeout (:mod:`.idle_close`): it sees
the idle connections the server closes, at checkout and by probing them while they sit
idle, and retires the rest before that age.
"""

from __future__ import annotations

import math
import ssl
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio

from ..config import ServerAddress, UpstreamConfig
from ..errors import Draining, PoolTimeout
from .connection import UpstreamConnection, open_connection
from .idle_close import RACE, IdleCloseLearner


class PooledConnection(Protocol):
    requests_sent: int
    keepalive_expiry: float | None
    keepalive_advertised: float | None
    idle_since: float  # set when it goes idle
    idle_age: float  # how long it had been idle when last checked out (0: new)
    probe_at: float  # when the reaper next checks that the server has not closed it

    def close(self) -> None: ...

    def is_readable(self) -> bool: ...


C = TypeVar("C", bound=PooledConnection)


class Waiter(Generic[C]):
    """A request queued for a connection: it is handed either a connection or a connect slot.

    ``task`` is the queued task, asleep until the shell reschedules it: handed something,
    timed out at ``deadline`` (by the pool's reaper), or woken by a drain.
    """

    __slots__ = ("connection", "deadline", "may_connect", "on_wait", "task")

    def __init__(
        self,
        task: trio.lowlevel.Task | None = None,
        deadline: float = math.inf,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.task = task
        self.deadline = deadline
        self.on_wait = on_wait
        self.connection: C | None = None
        self.may_connect = False


# The wait queue, shared with the HTTP/2 pool. A queued task sleeps without a timer (a cancel
# scope) or an Event of its own: whoever takes it out of the queue (handing it a connection,
# a stream or a connect slot; the pool's reaper at its deadline; a drain) reschedules it.


class Queued(Protocol):
    task: trio.lowlevel.Task | None
    deadline: float
    on_wait: Callable[[], None] | None  # the exchange's, until called or the wait ends


Q = TypeVar("Q", bound=Queued)


async def wait_in_queue(waiters: deque[Q], waiter: Q) -> None:
    """Sleep until ``wake(waiter)``; cancelled while still queued, leave the queue."""

    def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # Only called while it sleeps un-woken, so it is still in the queue.
        waiters.remove(waiter)
        waiter.on_wait = None
        return trio.lowlevel.Abort.SUCCEEDED

    await trio.lowlevel.wait_task_rescheduled(abort)


def wake(waiter: Queued) -> None:
    """Reschedule a waiter taken out of the queue."""
    assert waiter.task is not None
    waiter.on_wait = None
    trio.lowlevel.reschedule(waiter.task)


def due_waiters(waiters: deque[Q], now: float) -> list[Q]:
    """Take the waiters whose deadline has come out of the queue (in FIFO order, every wait
    being as long, the deadlines are in order)."""
    due = []
    while waiters and waiters[0].deadline <= now:
        due.append(waiters.popleft())
    return due


def move_deadlines(waiters: deque[Q], deadline: float) -> None:
    """No waiter waits past ``deadline`` (it applies to all: the order holds)."""
    for waiter in waiters:
        waiter.deadline = min(waiter.deadline, deadline)


# A queued request's client is watched (the exchange's ``on_wait``: a task that notices the
# client leaving) once the request has waited this long, not as it joins the queue: most
# waits end sooner, and a wait that ends soon does not need a watch.
WATCH_AFTER = 0.1


class ClientWatches:
    """The waiters whose ``on_wait`` is still to be called, each at its time, in queue order;
    the pool's reaper calls them. A waiter whose wait ended (its ``on_wait`` cleared) is
    dropped when it comes up."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: deque[tuple[float, Queued]] = deque()

    def add(self, waiter: Queued, queued_at: float) -> float:
        """Returns when it is due."""
        due = queued_at + WATCH_AFTER
        self._due.append((due, waiter))
        return due

    def next_due(self) -> float:
        return self._due[0][0] if self._due else math.inf

    def call_due(self, now: float) -> None:
        due = self._due
        while due:
            at, waiter = due[0]
            if waiter.on_wait is not None:
                if at > now:
                    return
                on_wait, waiter.on_wait = waiter.on_wait, None
                on_wait()
            due.popleft()


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    in_use: int
    idle: int
    connecting: int
    waiting: int
    opened: int
    reused: int
    closed: Mapping[
        str, int
    ]  # by reason: idle_timeout, keepalive_timeout, learned_timeout, error, max_requests, max_idle, stale, drain, upgraded, upstream_close
    queue_rejected: int  # queue full
    queue_timeouts: int
    queue_waits: int
    queue_wait_seconds: float


class PoolCounts:
    """What a pool has done so far (both pools keep these): the counters of its statistics."""

    __slots__ = (
        "closed",
        "opened",
        "queue_rejected",
        "queue_timeouts",
        "queue_wait_seconds",
        "queue_waits",
        "reused",
    )

    def __init__(self) -> None:
        self.closed: Counter[str] = Counter()  # by reason
        self.opened = 0
        self.reused = 0
        self.queue_rejected = 0
        self.queue_timeouts = 0
        self.queue_waits = 0
        self.queue_wait_seconds = 0.0

    def statistics(
        self, *, in_use: int, idle: int, connecting: int, waiting: int
    ) -> PoolStatistics:
        return PoolStatistics(
            in_use=in_use,
            idle=idle,
            connecting=connecting,
            waiting=waiting,
            opened=self.opened,
            reused=self.reused,
            closed=dict(self.closed),
            queue_rejected=self.queue_rejected,
            queue_timeouts=self.queue_timeouts,
            queue_waits=self.queue_waits,
            queue_wait_seconds=self.queue_wait_seconds,
        )


class PoolState(Generic[C]):
    """Pure pool accounting. Methods return what to close; the shell closes it."""

    def __init__(self, *, max_connections: int, max_idle: int, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: deque[tuple[C, float]] = deque()  # (connection, expires_at); newest on the right
        self.in_use = 0
        self.connecting = 0
        # FIFO; every waiter waits the same queue_timeout (or less, to a drain's deadline that
        # applies to all), so the deadlines are in queue order too: the head's is the next.
        self.waiters: deque[Waiter[C]] = deque()
        self.learner = IdleCloseLearner()
        # What the learner says, kept at hand for put_back (every request): the longest an
        # idle connection is kept, and whether idle connections are probed.
        self._keep_idle = idle_timeout
        self._probing = True

    @property
    def total(self) -> int:
        return self.in_use + self.connecting + len(self.idle)

    def can_open(self) -> bool:
        return self.total < self.max_connections

    def expiry(self, connection: C, now: float) -> float:
        if now >= self.learner.forget_at:
            self._relearned(now)
        expires = now + self._keep_idle
        if connection.keepalive_expiry is not None:
            expires = min(expires, connection.keepalive_expiry)
        return expires

    def _expiry_reason(self, connection: C, expires_at: float) -> str:
        if connection.keepalive_expiry is not None and expires_at >= connection.keepalive_expiry:
            return "keepalive_timeout"
        if expires_at < connection.idle_since + self.idle_timeout:
            return "learned_timeout"
        return "idle_timeout"

    def take_idle(
        self, now: float, *, replayable: bool = True
    ) -> tuple[C | None, list[tuple[C, str]]]:
        """The most recently used live idle connection (LIFO keeps the hot ones warm).

        A request that cannot be replayed (its body goes up and is not held) gets none
        while the server's idle timeout is unknown and the newest idle connection is older
        than the learner trusts (``IdleCloseLearner.unreplayable_limit``), so that the
        caller opens a fresh one, capacity permitting.
        """
        dead: list[tuple[C, str]] = []
        idle = self.idle
        while idle:
            connection, expires_at = idle.pop()
            if expires_at <= now:
                dead.append((connection, self._expiry_reason(connection, expires_at)))
            elif connection.is_readable():
                dead.append((connection, "stale"))
                self.learn_close(now - connection.idle_since, now)
            else:
                age = now - connection.idle_since
                if (
                    not replayable
                    and connection.keepalive_advertised is None
                    and age > self.learner.unreplayable_limit(now)
                    # room for a fresh one with this one still idle (it is popped)
                    and self.total + 1 < self.max_connections
                ):
                    idle.append((connection, expires_at))
                    return None, dead
                connection.idle_age = age
                self.in_use += 1
                return connection, dead
        return None, dead

    def put_back(self, connection: C, now: float) -> tuple[Waiter[C] | None, str | None]:
        """A reusable connection comes back: to the first waiter, else the idle stack.

        Returns the waiter it went to, or a close reason if it must be closed instead.
        The caller has already taken it out of ``in_use``.
        """
        if connection.idle_age and self.learner.record_alive(connection.idle_age):
            self._relearned(now)
        connection.idle_age = 0.0
        connection.idle_since = now  # handed to a waiter, it is checked out at once
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.connection = connection
            self.in_use += 1
            return waiter, None
        if len(self.idle) >= self.max_idle:
            return None, "max_idle"
        expires_at = self.expiry(connection, now)
        if expires_at <= now:
            return None, self._expiry_reason(connection, expires_at)
        if self._probing and connection.keepalive_advertised is None:
            connection.probe_at = now + PROBE_FIRST
        else:
            connection.probe_at = math.inf
        self.idle.append((connection, expires_at))
        return None, None

    def grant_capacity(self) -> Waiter[C] | None:
        """After capacity was freed: let the first waiter open a connection (slot reserved)."""
        if self.waiters and self.can_open():
            waiter = self.waiters.popleft()
            waiter.may_connect = True
            self.connecting += 1
            return waiter
        return None

    def next_queue_deadline(self) -> float:
        return self.waiters[0].deadline if self.waiters else math.inf

    def time_out_waiters(self, now: float) -> list[Waiter[C]]:
        """The waiters whose deadline has come, out of the queue (handed nothing)."""
        return due_waiters(self.waiters, now)

    def expire(self, now: float) -> list[tuple[C, str]]:
        keep: deque[tuple[C, float]] = deque()
        dead: list[tuple[C, str]] = []
        for connection, expires_at in self.idle:
            if expires_at <= now:
                dead.append((connection, self._expiry_reason(connection, expires_at)))
            else:
                keep.append((connection, expires_at))
        self.idle = keep
        return dead

    def next_expiry(self) -> float:
        return min((expires_at for _, expires_at in self.idle), default=math.inf)

    # -- learning the server's idle timeout ------------------------------------------------

    def learn_close(self, age: float, now: float) -> None:
        """The server closed a connection at the idle age ``age``; found closed ``now``."""
        if self.learner.record_close(age, now):
            self._relearned(now)

    def _relearned(self, now: float) -> None:
        """The learned timeout changed: the idle connections' expiry moves with it."""
        retire = self.learner.retire_age(now)
        self._keep_idle = min(self.idle_timeout, retire)
        self._probing = probing = self.learner.timeout is None
        entries = list(self.idle)
        self.idle.clear()
        for connection, _ in entries:
            expires_at = connection.idle_since + self._keep_idle
            if connection.keepalive_expiry is not None:
                expires_at = min(expires_at, connection.keepalive_expiry)
            if not probing:
                connection.probe_at = math.inf
            elif connection.keepalive_advertised is None and connection.probe_at == math.inf:
                connection.probe_at = now
            self.idle.append((connection, expires_at))

    def probe(self, now: float) -> list[tuple[C, str]]:
        """Check the idle connections whose probe is due: those the server closed are dead
        (and teach the learner its timeout), the others proved alive at their age."""
        dead: list[tuple[C, str]] = []
        keep: list[tuple[C, float]] = []
        learner = self.learner
        changed = False
        for connection, expires_at in self.idle:
            if connection.probe_at <= now:
                age = now - connection.idle_since
                if connection.is_readable():
                    dead.append((connection, "stale"))
                    changed = learner.record_close(age, now) or changed
                    continue
                changed = learner.record_alive(age) or changed
                connection.probe_at = now + max(PROBE_FIRST, age * PROBE_STEP)
            keep.append((connection, expires_at))
        if dead or changed:
            self.idle.clear()
            self.idle.extend(keep)
        if changed:
            self._relearned(now)
        return dead

    def next_probe(self) -> float:
        return min((connection.probe_at for connection, _ in self.idle), default=math.inf)


# An idle connection of a server whose timeout is unknown is checked (one select) when it has
# been idle this long, then each time its age has grown by a tenth: the close is seen within
# ~10% of the age it happened at, in a few dozen checks over a long idle life.
PROBE_FIRST = 0.05
PROBE_STEP = 0.1


Connector = Callable[[ServerAddress], Awaitable[UpstreamConnection]]


class UpstreamPool:
    """The connections to one upstream server. ``acquire`` is cancellation-safe."""

    def __init__(
        self,
        server: ServerAddress,
        config: UpstreamConfig,
        *,
        connect: Connector | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.config = config
        self.ssl_context = ssl_context  # for an https:// server; read at each connect
        self._connect: Connector = connect or self._open_connection
        self._state: PoolState[UpstreamConnection] = PoolState(
            max_connections=config.max_connections,
            max_idle=config.max_idle,
            idle_timeout=config.idle_timeout,
        )
        self.counts = PoolCounts()
        self._closing = False
        self._waits_end = math.inf  # no queue wait lasts past this (set by a drain)
        self._reaper_wakeup = trio.Event()
        self._reaper_target = math.inf
        self._watches = ClientWatches()

    def __repr__(self) -> str:
        s = self._state
        return (
            f"<UpstreamPool {self.server} in_use={s.in_use} idle={len(s.idle)} "
            f"connecting={s.connecting} waiting={len(s.waiters)}>"
        )

    async def _open_connection(self, server: ServerAddress) -> UpstreamConnection:
        return await open_connection(
            server,
            connect_timeout=self.config.connect_timeout,
            ssl_context=self.ssl_context,
            server_name=self.config.tls_server_name,
        )

    async def open_unpooled(self) -> UpstreamConnection:
        """A connection opened as the pool opens its own (TLS, SNI, connect timeout), outside
        its accounting: for health probes, which must not take a request's slot."""
        return await self._connect(self.server)

    def statistics(self) -> PoolStatistics:
        s = self._state
        return self.counts.statistics(
            in_use=s.in_use, idle=len(s.idle), connecting=s.connecting, waiting=len(s.waiters)
        )

    @property
    def load(self) -> int:
        """Connections busy or about to be, for least_conn balancing."""
        return self._state.in_use + self._state.connecting + len(self._state.waiters)

    def _close(self, connection: UpstreamConnection, reason: str) -> None:
        connection.close()
        self.counts.closed[reason] += 1

    def take_idle(self, *, replayable: bool = True) -> UpstreamConnection | None:
        """An idle connection, at once and without waiting, if one is free (the connections
        found expired on the way are closed); ``None`` if ``acquire`` would have to wait for
        a connection, a connect or the queue. ``replayable`` is False for a request that
        could not be sent again if the server closed the connection under it (see
        ``PoolState.take_idle``)."""
        if self._closing:
            return None
        connection, dead = self._state.take_idle(trio.current_time(), replayable=replayable)
        if dead:
            for stale, reason in dead:
                self._close(stale, reason)
            self._reaper_wakeup.set()  # a stale one may have taught a shorter timeout
        if connection is not None:
            self.counts.reused += 1
        return connection

    async def acquire(
        self,
        *,
        replayable: bool = True,
        on_wait: Callable[[], None] | None = None,
        fresh: bool = False,
    ) -> tuple[UpstreamConnection, bool]:
        """A connection for one exchange, and whether it is a reused one.

        Raises ``PoolTimeout`` when the wait queue is full or the wait exceeds
        ``queue_timeout``, and the connect errors of :func:`open_connection`.
        ``replayable``: as for ``take_idle``. ``on_wait`` (the exchange's: the client is
        watched from then on) is called when there is no idle connection to hand out at
        once: before a connect, or, by the reaper, once a wait in the queue has lasted
        ``WATCH_AFTER``. ``fresh``: a new connection rather than an idle one, if there is
        room for one (a request sent again after the server failed on a reused one).
        """
        if self._closing:
            raise Draining("upstream pool is closing")
        fresh = fresh and self._state.can_open()
        connection = None if fresh else self.take_idle(replayable=replayable)
        if connection is not None:
            # No checkpoint on this path on purpose: it is the hot path, and the exchange
            # checkpoints on its first send anyway.
            return connection, True
        if self._state.can_open():
            if on_wait is not None:
                on_wait()
            self._state.connecting += 1
            return await self._open(), False
        return await self._wait(on_wait)

    async def _wait(self, on_wait: Callable[[], None] | None) -> tuple[UpstreamConnection, bool]:
        state = self._state
        if len(state.waiters) >= self.config.queue_size:
            self.counts.queue_rejected += 1
            raise PoolTimeout(f"wait queue for {self.server} is full ({self.config.queue_size})")
        started = trio.current_time()
        deadline = min(started + (self.config.queue_timeout or math.inf), self._waits_end)
        waiter: Waiter[UpstreamConnection] = Waiter(trio.lowlevel.current_task(), deadline, on_wait)
        state.waiters.append(waiter)
        self.counts.queue_waits += 1
        wake_at = deadline  # the reaper's, for this waiter
        if on_wait is not None:
            wake_at = min(wake_at, self._watches.add(waiter, started))
        if wake_at < self._reaper_target:
            self._reaper_wakeup.set()
        try:
            await wait_in_queue(state.waiters, waiter)
        finally:
            self.counts.queue_wait_seconds += trio.current_time() - started
        if waiter.connection is not None:
            self.counts.reused += 1
            return waiter.connection, True
        if waiter.may_connect:
            return await self._open(), False
        if self._closing:
            raise Draining("upstream pool is closing")
        if trio.current_time() >= self._waits_end:
            raise Draining("no upstream connection came free before drain_timeout")
        self.counts.queue_timeouts += 1
        raise PoolTimeout(
            f"no connection to {self.server} within queue_timeout ({self.config.queue_timeout:g}s)"
        )

    def end_waits_by(self, deadline: float) -> None:
        """No request waits in the queue past ``deadline`` (the drain's): one still waiting
        then is answered 503 rather than cut without a word when the drain ends."""
        self._waits_end = min(self._waits_end, deadline)
        move_deadlines(self._state.waiters, deadline)
        self._reaper_wakeup.set()

    async def _open(self) -> UpstreamConnection:
        """Open a connection for a slot already counted in ``connecting``."""
        state = self._state
        started = trio.current_time()
        try:
            connection = await self._connect(self.server)
        except BaseException:
            state.connecting -= 1
            self._grant_capacity()
            raise
        connection.connect_time = trio.current_time() - started
        state.connecting -= 1
        state.in_use += 1
        self.counts.opened += 1
        return connection

    def _grant_capacity(self) -> None:
        waiter = self._state.grant_capacity()
        if waiter is not None:
            wake(waiter)

    def closed_under_us(self, connection: UpstreamConnection) -> bool:
        """The server closed this reused connection before the first byte of its response;
        the caller still releases it. True if that is the keep-alive race: the close came
        within ``idle_close.RACE`` of the request, and it is evidence of the server's idle
        timeout. A later close came while the server had the request: it failed on it.

        The request goes up in the same step as the checkout (the forwarder does not wait in
        between), so the connection was idle ``idle_age`` when it was sent, and the request
        was sent at ``idle_since + idle_age``: no clock read on every request for this."""
        now = trio.current_time()
        if now - (connection.idle_since + connection.idle_age) > RACE:
            return False
        if connection.idle_age:
            self._state.learn_close(connection.idle_age, now)
            self._reaper_wakeup.set()
        return True

    @property
    def learned_idle_timeout(self) -> float | None:
        """The server's idle timeout as learned from the closes the pool saw, if any."""
        return self._state.learner.timeout

    def release(
        self, connection: UpstreamConnection, *, reusable: bool, close_reason: str = "error"
    ) -> None:
        """Give a connection back. Only a connection whose exchange completed cleanly is reusable.

        ``close_reason`` counts a connection that is not reusable (``upgraded``: it carried
        a WebSocket tunnel).
        """
        state = self._state
        state.in_use -= 1
        reason: str | None = close_reason
        if reusable and connection.is_reusable() and not self._closing:
            limit = self.config.max_requests_per_connection
            if limit and connection.requests_sent >= limit:
                reason = "max_requests"
            else:
                connection.prepare_reuse()
                now = trio.current_time()
                waiter, reason = state.put_back(connection, now)
                if waiter is not None:
                    wake(waiter)
                    return
                if reason is None:
                    if min(state.idle[-1][1], connection.probe_at) < self._reaper_target:
                        self._reaper_wakeup.set()
                    return
        elif self._closing:
            reason = "drain"
        elif reusable and connection.upstream_ends_connection():
            reason = "upstream_close"
        assert reason is not None  # put_back's None returned above
        self._close(connection, reason)
        self._grant_capacity()

    async def run_reaper(self) -> None:
        """Close idle connections as they expire, so none outlives ``idle_timeout``; probe
        those of a server whose idle timeout is not known yet; time queued requests out at
        ``queue_timeout``. It must run for the pool to keep these bounds."""
        state = self._state
        try:
            await self._reap(state)
        finally:
            # Stopped (the pool is retired, or the proxy exits): nothing would time a wait
            # out any more, so none is left waiting.
            for waiter in state.time_out_waiters(math.inf):
                wake(waiter)

    async def _reap(self, state: PoolState[UpstreamConnection]) -> None:
        while True:
            self._reaper_wakeup = trio.Event()
            self._reaper_target = min(
                state.next_expiry(),
                state.next_probe(),
                state.next_queue_deadline(),
                self._watches.next_due(),
            )
            with trio.move_on_at(self._reaper_target):
                await self._reaper_wakeup.wait()
            now = trio.current_time()
            self._watches.call_due(now)
            for waiter in state.time_out_waiters(now):
                wake(waiter)
            expired = state.expire(now) + state.probe(now)
            for connection, reason in expired:
                self._close(connection, reason)
            if expired:
                self._grant_capacity()

    def close(self) -> None:
        """Stop pooling: close idle connections now, in-use ones when they come back."""
        self._closing = True
        state = self._state
        while state.idle:
            connection, _ = state.idle.pop()
            self._close(connection, "drain")
        while state.waiters:
            wake(state.waiters.popleft())  # with neither connection nor slot: Draining
