"""Per-user sliding-window rate limit, shared by every platform.

A flood must cost little: once a user is over the limit, `check` says so and allows exactly
one notice per window, and users idle for a whole window are forgotten (a sweep at most
once per window), so memory follows the users active in the last window, not all users ever.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    notify: bool = False       # over the limit and not yet told so in this window
    retry_in: float = 0.0


class RateLimiter:
    def __init__(self, max_events: int, window_s: float, clock=time.monotonic):
        self.max_events = max_events
        self.window_s = window_s
        self.clock = clock
        self._events: dict[tuple, collections.deque] = {}
        self._noticed: dict[tuple, float] = {}      # key -> when it was last told to slow down
        self._last_sweep = clock()

    def __len__(self) -> int:
        return len(self._events)

    def check(self, key: tuple) -> Verdict:
        """Record an event for `key`: allowed, or over the limit (with notify once per window)."""
        now = self.clock()
        self._sweep(now)
        events = self._events.setdefault(key, collections.deque())
        while events and now - events[0] >= self.window_s:
            events.popleft()
        if len(events) < self.max_events:
            events.append(now)
            return Verdict(True)
        retry_in = max(0.0, self.window_s - (now - events[0]))
        noticed = self._noticed.get(key)
        if noticed is not None and now - noticed < self.window_s:
            return Verdict(False, False, retry_in)
        self._noticed[key] = now
        return Verdict(False, True, retry_in)

    def peek(self, key: tuple) -> bool:
        """Whether an event for `key` would be allowed now (nothing is recorded)."""
        now = self.clock()
        return sum(1 for t in self._events.get(key, ()) if now - t < self.window_s) < self.max_events

    def allow(self, key: tuple) -> bool:
        """Record an event for `key` and say whether it is within the limit."""
        return self.check(key).allowed

    def retry_in(self, key: tuple) -> float:
        events = self._events.get(key)
        if not events:
            return 0.0
        return max(0.0, self.window_s - (self.clock() - events[0]))

    def _sweep(self, now: float) -> None:
        """Forget users with no event (and no notice) inside the window."""
        if now - self._last_sweep < self.window_s:
            return
        self._last_sweep = now
        for key in [k for k, ev in self._events.items() if not ev or now - ev[-1] >= self.window_s]:
            del self._events[key]
        for key in [k for k, t in self._noticed.items() if now - t >= self.window_s]:
            del self._noticed[key]
