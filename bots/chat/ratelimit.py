"""Per-user sliding-window rate limit, shared by every platform."""
from __future__ import annotations

import collections
import time


class RateLimiter:
    def __init__(self, max_events: int, window_s: float, clock=time.monotonic):
        self.max_events = max_events
        self.window_s = window_s
        self.clock = clock
        self._events: dict[tuple, collections.deque] = {}

    def allow(self, key: tuple) -> bool:
        """Record an event for `key` and say whether it is within the limit."""
        now = self.clock()
        events = self._events.setdefault(key, collections.deque())
        while events and now - events[0] >= self.window_s:
            events.popleft()
        if len(events) >= self.max_events:
            return False
        events.append(now)
        return True

    def retry_in(self, key: tuple) -> float:
        events = self._events.get(key)
        if not events:
            return 0.0
        return max(0.0, self.window_s - (self.clock() - events[0]))
