"""What a pool learns of its server's idle timeout when the server does not announce it.

Most servers close a keep-alive connection left idle for some fixed time, and many do not say
when (no ``Keep-Alive: timeout=N``). A request sent on such a connection just as the server
closes it is lost: one without a body, or with a small idempotent one, is replayed; any other
(a POST with a body) would become a 502. So the pool watches the server close idle
connections and learns its timeout, then retires that server's connections a margin before
it, as it does for an announced one.

The rule (pure: ages and times in, no I/O):

- Evidence of a close: an idle connection of the server found closed (at checkout, by a
  probe while it sits in the pool, or by the keep-alive race itself), at the idle age it was
  found. The race is a close found within ``RACE`` of sending the request, at the idle age
  the request was sent at (from the end of the last response): a close later than that
  came while the server had the request (it failed or crashed on it), and says nothing of
  its idle timeout. Several connections found closed at the same moment are one piece of
  evidence, at their largest age: a restart closes them all at once, whatever their ages.
- Evidence of life: a connection reused successfully, or probed, after being idle ``age``.
  It withdraws every close at or below that age (the server kept a connection longer), and
  a new close lowers it in turn: the newest evidence wins.
- The timeout is learned once two closes among the last ``SAMPLES`` agree (within
  ``AGREEMENT``): the lower of the lowest agreeing pair. One early close (a server closing a
  connection for another reason) never decides alone. Closes older than ``WINDOW`` are
  forgotten, so even two early ones retire connections early for at most that long.
- Until the timeout is learned, a request that cannot be replayed takes an idle connection
  only if it has been idle no longer than ``RECENT`` or than connections have been seen to
  survive (less the margin); else it gets a fresh one.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import pairwise

from .connection import KEEPALIVE_SAFETY_MARGIN

SAMPLES = 8
AGREEMENT = 1.25  # two closes agree when the later age is at most this times the earlier
WINDOW = 600.0  # seconds a close counts as evidence
SIMULTANEOUS = 0.01  # closes found within this many seconds of each other are one event
RECENT = 0.1  # idle seconds a non-replayable request accepts before anything is learned
# Seconds after sending a request on a reused connection within which finding it closed is
# the keep-alive race: the server's close crossed the request on the way (a round trip).
RACE = 0.5


def margin(timeout: float) -> float:
    """How long before an idle timeout a connection is retired: as long as before an
    announced one, but never more than a quarter of a short one (a server that closes after
    one second is still reused)."""
    return min(KEEPALIVE_SAFETY_MARGIN, timeout / 4)


class IdleCloseLearner:
    """One server's idle timeout, learned from the closes the pool sees (see the module doc)."""

    __slots__ = ("_closes", "alive_age", "forget_at", "timeout")

    def __init__(self) -> None:
        self._closes: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (seen at, age)
        self.alive_age = 0.0  # the longest idle age a connection was seen to survive
        self.timeout: float | None = None  # the learned idle timeout, in seconds
        self.forget_at = math.inf  # when the oldest close counted stops counting

    def __repr__(self) -> str:
        return f"<IdleCloseLearner timeout={self.timeout} alive_age={self.alive_age:.3f}>"

    def record_close(self, age: float, now: float) -> bool:
        """The server closed an idle connection at this idle age. True if the learned
        timeout changed."""
        closes = self._closes
        if closes and now - closes[-1][0] <= SIMULTANEOUS:
            seen_at, earlier = closes.pop()
            closes.append((seen_at, max(age, earlier)))
        else:
            closes.append((now, age))
        self.alive_age = min(self.alive_age, age)
        return self._decide(now)

    def record_alive(self, age: float) -> bool:
        """A connection was still open after ``age`` idle seconds. True if the learned
        timeout changed. Cheap when nothing changes: it runs after every reused exchange."""
        if age <= self.alive_age:
            return False
        self.alive_age = age
        closes = self._closes
        if not closes or min(close for _, close in closes) > age:
            return False
        kept = [(seen_at, close) for seen_at, close in closes if close > age]
        closes.clear()
        closes.extend(kept)
        return self._decide(None)

    def _decide(self, now: float | None) -> bool:
        closes = self._closes
        if now is not None:
            while closes and closes[0][0] <= now - WINDOW:
                closes.popleft()
        ages = sorted(age for _, age in closes)
        learned = next(
            (lower for lower, higher in pairwise(ages) if higher <= lower * AGREEMENT), None
        )
        self.forget_at = min(seen_at for seen_at, _ in closes) + WINDOW if closes else math.inf
        changed = learned != self.timeout
        self.timeout = learned
        return changed

    def retire_age(self, now: float) -> float:
        """The idle age at which the server's connections are retired (``inf``: unknown)."""
        if now >= self.forget_at:
            self._decide(now)
        timeout = self.timeout
        return math.inf if timeout is None else timeout - margin(timeout)

    def unreplayable_limit(self, now: float) -> float:
        """The longest idle age a connection may have for a request that cannot be replayed."""
        if self.retire_age(now) < math.inf:
            return math.inf  # connections are retired before the learned timeout anyway
        alive = self.alive_age
        return max(RECENT, alive - margin(alive))
