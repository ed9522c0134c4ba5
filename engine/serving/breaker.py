"""Bounded retries and a circuit breaker for a remote backend.

A dead backend must not make every chat wait through every retry: after `failures`
failed requests in a row the breaker opens and requests fail at once (the user gets a
short apology) for `cooldown_s`; then one request is let through as a probe. If it
succeeds the breaker closes and the bot is back; if not, it stays open for another
cooldown. The clock is injectable so the states can be tested without waiting.
"""
from __future__ import annotations

import time
from typing import Callable


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, failures: int = 5, cooldown_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if failures < 1:
            raise ValueError("a circuit breaker needs failures >= 1")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failed_in_row = 0
        self.opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return self.CLOSED
        if self._probing or self.clock() >= self.opened_at + self.cooldown_s:
            return self.HALF_OPEN
        return self.OPEN

    def retry_in(self) -> float:
        """Seconds until the next probe may go out (0 when closed or due)."""
        if self.opened_at is None:
            return 0.0
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def allow(self) -> bool:
        """May a request go out now? While half-open, only one probe at a time."""
        state = self.state
        if state == self.CLOSED:
            return True
        if state == self.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failed_in_row = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failed_in_row += 1
        if self._probing or self.failed_in_row >= self.failures:
            self.opened_at = self.clock()   # (re)open: the probe failed, or too many in a row
        self._probing = False

    def describe(self) -> str:
        state = self.state
        if state == self.CLOSED:
            return "ok" if not self.failed_in_row else f"ok ({self.failed_in_row} failed request(s) in a row)"
        if state == self.OPEN:
            return f"down: {self.failed_in_row} failures in a row, next try in {self.retry_in():.0f} s"
        return f"down: {self.failed_in_row} failures in a row, the next request is a probe"


def backoff_delays(retries: int, first_s: float, cap_s: float = 10.0) -> list[float]:
    """The waits between attempts: first_s, doubling, capped (retries waits in all)."""
    return [min(first_s * 2 ** i, cap_s) for i in range(retries)]
