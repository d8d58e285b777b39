"""A bounded pool of HTTP/2 connections to one upstream server, handing out streams.

The HTTP/1.1 pool's contract (pool.py), with streams as what is handed out:

- capacity: at most ``max_connections`` connections (open, being opened, or retired and
  finishing their streams), each carrying up to the server's
  ``SETTINGS_MAX_CONCURRENT_STREAMS`` streams at once;
- a request takes a stream on the oldest connection with room, so the newer ones go idle
  and expire; a new connection is opened only when none has room and the ones being opened
  are not expected to take the requests already waiting (each is counted for
  ``ASSUMED_STREAMS`` until its SETTINGS say how many it takes);
- the FIFO wait queue, ``queue_size`` long, waited in for ``queue_timeout``: PoolTimeout;
- a connection without streams for ``idle_timeout`` is closed by the reaper; at most
  ``max_idle`` idle ones are kept; after ``max_requests_per_connection`` streams a
  connection takes no more and closes once they are done;
- a GOAWAY from the server retires its connection the same way; the streams it did not
  process fail with ``StreamNotProcessed``, which the forwarder replays;
- ``close()`` (a drain, a reload): idle connections close now, busy ones once their last
  stream ends.

The connections' tasks run in the reaper's nursery, shielded: a pool retired by a reload
lets them finish their streams; at exit (the reaper cancelled before ``close()``) they are
stopped at once.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import Callable

import trio

from ..config import ServerAddress, UpstreamConfig
from ..errors import Draining, PoolTimeout, ProxyInternalError
from .h2_connection import H2UpstreamConnection, H2UpstreamStream, open_h2_connection
from .pool import (
    ClientWatches,
    PoolCounts,
    PoolStatistics,
    due_waiters,
    move_deadlines,
    wait_in_queue,
    wake,
)

ASSUMED_STREAMS = 100  # RFC 9113 section 6.5.2 recommends servers allow at least 100


class _Waiter:
    """A request queued for a stream: it is handed either a stream or a connect slot (see
    pool.wait_in_queue)."""

    __slots__ = ("deadline", "may_connect", "on_wait", "stream", "task")

    def __init__(
        self, task: trio.lowlevel.Task, deadline: float, on_wait: Callable[[], None] | None
    ) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.deadline = deadline
        self.on_wait = on_wait
        self.stream: H2UpstreamStream | None = None
        self.may_connect = False


class H2Pool:
    """The HTTP/2 connections to one upstream server. ``acquire`` is cancellation-safe."""

    def __init__(
        self,
        server: ServerAddress,
        config: UpstreamConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.server = server
        self.config = config
        self.ssl_context = ssl_context  # for an https:// server; read at each connect
        self._connections: list[H2UpstreamConnection] = []  # oldest first
        self._connecting = 0
        self._waiters: deque[_Waiter] = deque()
        self.counts = PoolCounts()
        self._closed_by_pool: set[H2UpstreamConnection] = set()  # counted in counts.closed
        self._closing = False
        self._waits_end = math.inf  # no queue wait lasts past this (set by a drain)
        self._nursery: trio.Nursery | None = None
        self._unpooled: set[H2UpstreamConnection] = set()  # health probes' connections
        self._reaper_wakeup = trio.Event()
        self._reaper_target = math.inf
        self._watches = ClientWatches()

    def __repr__(self) -> str:
        return (
            f"<H2Pool {self.server} connections={len(self._connections)} "
            f"streams={self._streams()} connecting={self._connecting} "
            f"waiting={len(self._waiters)}>"
        )

    def _streams(self) -> int:
        return sum(connection.active for connection in self._connections)

    def statistics(self) -> PoolStatistics:
        """Connections in use are those with a stream; ``reused``: streams opened on a
        connection that was already open."""
        busy = idle = 0
        for connection in self._connections:
            if connection.closed:
                continue  # on its way out: its goodbye is being written
            if connection.active:
                busy += 1
            else:
                idle += 1
        return self.counts.statistics(
            in_use=busy, idle=idle, connecting=self._connecting, waiting=len(self._waiters)
        )

    @property
    def load(self) -> int:
        """Exchanges on it or about to be, for least_conn balancing."""
        return self._streams() + self._connecting + len(self._waiters)

    # -- handing out streams ---------------------------------------------------------------

    def take_idle(self, *, replayable: bool = True) -> H2UpstreamStream | None:
        """A stream on an open connection, at once, if one has room; ``None`` if ``acquire``
        would have to wait for a connect or the queue."""
        if self._closing:
            return None
        stream = self._take_stream()
        if stream is not None:
            self.counts.reused += 1
        return stream

    async def acquire(
        self,
        *,
        replayable: bool = True,
        on_wait: Callable[[], None] | None = None,
        fresh: bool = False,
    ) -> tuple[H2UpstreamStream, bool]:
        """A stream for one exchange, and whether its connection was already open.

        Raises ``PoolTimeout`` when the wait queue is full or the wait exceeds
        ``queue_timeout``, and the connect errors of :func:`open_h2_connection`.
        ``replayable`` is HTTP/1.1's care about reusing a connection the server may be
        closing: an HTTP/2 server says GOAWAY first, and what it did not process is replayed.
        ``on_wait`` is called as the HTTP/1.1 pool calls it (before a connect, or once a
        wait in the queue has lasted ``pool.WATCH_AFTER``). ``fresh`` too is HTTP/1.1's: a
        stream is new whatever connection it is on.
        """
        if self._closing:
            raise Draining("upstream pool is closing")
        stream = self.take_idle()
        if stream is not None:
            return stream, True
        if self._should_open(len(self._waiters) + 1):
            if on_wait is not None:
                on_wait()
            self._connecting += 1
            return await self._open()
        return await self._wait(on_wait)

    async def open_unpooled(self) -> H2UpstreamStream:
        """A stream on a connection of its own, opened as the pool opens its own but outside
        its accounting (for health probes); closing the stream closes the connection."""
        if self._nursery is None:
            raise Draining(f"the HTTP/2 pool for {self.server} is not running")
        connection = await open_h2_connection(
            self.server,
            connect_timeout=self.config.connect_timeout,
            ssl_context=self.ssl_context,
            server_name=self.config.tls_server_name,
        )
        connection.active = 1  # not in _connections: the pool hands out none of its streams
        self._unpooled.add(connection)
        self._nursery.start_soon(self._run_unpooled, connection)
        return H2UpstreamStream(connection, owns_connection=True)

    async def _run_unpooled(self, connection: H2UpstreamConnection) -> None:
        try:
            await connection.run()
        finally:
            self._unpooled.discard(connection)

    def closed_under_us(self, connection: H2UpstreamStream) -> bool:
        """Nothing to learn (HTTP/1.1's pool learns the server's idle timeout from this):
        an HTTP/2 server that closes an idle connection says GOAWAY first. Taken as the
        race, as it always was: the stream has no send time to tell it by."""
        return True

    def _take_stream(self) -> H2UpstreamStream | None:
        for connection in self._connections:
            if connection.available > 0:
                return self._new_stream(connection)
        return None

    def _new_stream(self, connection: H2UpstreamConnection) -> H2UpstreamStream:
        connection.active += 1
        connection.requests_sent += 1
        limit = self.config.max_requests_per_connection
        if limit and connection.requests_sent >= limit:
            connection.retired = True
        return H2UpstreamStream(connection)

    def _should_open(self, demand: int) -> bool:
        """Whether ``demand`` requests without a stream call for one more connection."""
        return (
            len(self._connections) + self._connecting < self.config.max_connections
            and self._connecting * ASSUMED_STREAMS < demand
        )

    async def _wait(self, on_wait: Callable[[], None] | None) -> tuple[H2UpstreamStream, bool]:
        if len(self._waiters) >= self.config.queue_size:
            self.counts.queue_rejected += 1
            raise PoolTimeout(f"wait queue for {self.server} is full ({self.config.queue_size})")
        started = trio.current_time()
        deadline = min(started + (self.config.queue_timeout or math.inf), self._waits_end)
        waiter = _Waiter(trio.lowlevel.current_task(), deadline, on_wait)
        self._waiters.append(waiter)
        self.counts.queue_waits += 1
        wake_at = deadline  # the reaper's, for this waiter
        if on_wait is not None:  # called by the reaper if the wait lasts (pool.ClientWatches)
            wake_at = min(wake_at, self._watches.add(waiter, started))
        if wake_at < self._reaper_target:
            self._reaper_wakeup.set()
        try:
            await wait_in_queue(self._waiters, waiter)
        finally:
            self.counts.queue_wait_seconds += trio.current_time() - started
        if waiter.stream is not None:
            self.counts.reused += 1
            return waiter.stream, True
        if waiter.may_connect:
            return await self._open()
        if self._closing:
            raise Draining("upstream pool is closing")
        if trio.current_time() >= self._waits_end:
            raise Draining("no upstream stream came free before drain_timeout")
        self.counts.queue_timeouts += 1
        raise PoolTimeout(
            f"no stream to {self.server} within queue_timeout ({self.config.queue_timeout:g}s)"
        )

    def end_waits_by(self, deadline: float) -> None:
        """No request waits in the queue past ``deadline`` (the drain's), as in pool.py."""
        self._waits_end = min(self._waits_end, deadline)
        move_deadlines(self._waiters, deadline)
        self._reaper_wakeup.set()

    async def _open(self) -> tuple[H2UpstreamStream, bool]:
        """Open a connection for a slot already counted in ``_connecting``; its first stream."""
        started = trio.current_time()
        try:
            if self._nursery is None:
                raise ProxyInternalError(f"the HTTP/2 pool for {self.server} is not running")
            connection = await open_h2_connection(
                self.server,
                connect_timeout=self.config.connect_timeout,
                ssl_context=self.ssl_context,
                server_name=self.config.tls_server_name,
            )
        except BaseException:
            self._connecting -= 1
            self._dispatch()
            raise
        self._connecting -= 1
        self.counts.opened += 1
        connection.connect_time = trio.current_time() - started
        connection.on_change = lambda: self._changed(connection)
        self._connections.append(connection)
        self._nursery.start_soon(self._run, connection)
        stream = self._new_stream(connection)
        stream.connect_time = connection.connect_time
        self._dispatch()
        return stream, False

    def _dispatch(self) -> None:
        """Hand free streams to waiters, then let one open a connection if that is called for."""
        waiters = self._waiters
        while waiters:
            stream = self._take_stream()
            if stream is None:
                break
            waiter = waiters.popleft()
            waiter.stream = stream
            wake(waiter)
        if waiters and not self._closing and self._should_open(len(waiters)):
            waiter = waiters.popleft()
            waiter.may_connect = True
            self._connecting += 1
            wake(waiter)

    def release(
        self, connection: H2UpstreamStream, *, reusable: bool, close_reason: str = "error"
    ) -> None:
        """Take a stream back (``connection``: the forwarder's name for what it acquired).

        A stream whose exchange did not complete (``reusable`` false, or either side still
        open) is reset; its connection carries on. ``close_reason`` is HTTP/1.1's.
        """
        stream = connection
        stream.finish(reset=not reusable)
        owner = stream.connection
        owner.active -= 1
        if not owner.active:
            owner.idle_since = trio.current_time()
            self._settle(owner)
        self._dispatch()

    def _changed(self, connection: H2UpstreamConnection) -> None:
        """The server changed what ``connection`` takes (SETTINGS, GOAWAY)."""
        if not connection.active:
            self._settle(connection)
        self._dispatch()

    def _settle(self, connection: H2UpstreamConnection) -> None:
        """A connection without streams: closed if it takes no more, else left to the reaper."""
        if connection.closed:
            return
        if self._closing:
            self._close(connection, "drain")
        elif connection.retired:
            self._close(connection, "upstream_close" if connection.goaway else "max_requests")
        elif sum(1 for c in self._connections if not c.active) > self.config.max_idle:
            self._close(connection, "max_idle")
        else:
            self._reaper_wakeup.set()

    def _close(self, connection: H2UpstreamConnection, reason: str) -> None:
        if connection not in self._closed_by_pool:
            self._closed_by_pool.add(connection)
            self.counts.closed[reason] += 1
        connection.close()

    async def _run(self, connection: H2UpstreamConnection) -> None:
        try:
            await connection.run()
        finally:
            self._connections.remove(connection)
            if connection in self._closed_by_pool:
                self._closed_by_pool.discard(connection)
            else:
                # The server ended it: after a GOAWAY or while idle, as servers do; else
                # with streams in flight, a failure.
                clean = connection.goaway is not None or not connection.active
                self.counts.closed["upstream_close" if clean else "error"] += 1
            self._dispatch()

    # -- reaping and closing ---------------------------------------------------------------

    async def run_reaper(self) -> None:
        """Close connections idle for ``idle_timeout`` and time queued requests out at
        ``queue_timeout``; the connections' tasks run in here."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._reap()
            finally:
                self._nursery = None
                for waiter in due_waiters(self._waiters, math.inf):
                    wake(waiter)  # nothing would time it out any more
                for connection in list(self._unpooled):
                    connection.abort()
                if not self._closing:
                    # Cancelled without close(): the proxy is stopping, nothing is left
                    # to finish.
                    for connection in list(self._connections):
                        connection.abort()

    async def _reap(self) -> None:
        idle_timeout = self.config.idle_timeout
        while True:
            self._reaper_wakeup = trio.Event()
            now = trio.current_time()
            self._watches.call_due(now)
            for waiter in due_waiters(self._waiters, now):
                wake(waiter)
            next_expiry = math.inf
            for connection in list(self._connections):
                if connection.active or connection.closed:
                    continue
                expires_at = connection.idle_since + idle_timeout
                if expires_at <= now:
                    self._close(connection, "idle_timeout")
                else:
                    next_expiry = min(next_expiry, expires_at)
            if self._waiters:
                next_expiry = min(next_expiry, self._waiters[0].deadline)
            next_expiry = min(next_expiry, self._watches.next_due())
            self._reaper_target = next_expiry
            with trio.move_on_at(next_expiry):
                await self._reaper_wakeup.wait()

    def close(self) -> None:
        """Stop pooling: idle connections close now, busy ones once their streams end."""
        self._closing = True
        for connection in list(self._connections):
            if connection.active:
                connection.retired = True
            else:
                self._close(connection, "drain")
        while self._waiters:
            wake(self._waiters.popleft())  # with neither stream nor slot: Draining
