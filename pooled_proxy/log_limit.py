"""Repeated warnings, rate-limited: one line per key per interval, with a count of the rest.

An upstream outage fails every request the same way; a line for each would flood the log
and bury everything else in it.
"""

from __future__ import annotations

from collections.abc import Hashable


class WarningLimiter:
    """Decides which of a stream of repeated warnings are written."""

    __slots__ = ("_interval", "_last")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        # key -> (when its last line was written, how many were suppressed since)
        self._last: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable, now: float) -> int | None:
        """``None`` if a warning for ``key`` is to be suppressed now; else write it, noting
        the returned number of identical ones suppressed since the last line."""
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) > 1024:  # keys are servers and error kinds: few, but bounded
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._interval}
        self._last[key] = (now, 0)
        return 0 if last is None else last[1]
