"""The per-user rate limit across workers (a shared PostgreSQL database).

Behind a round-robin load balancer a user's messages land on every worker in turn; each
worker's own RateLimiter would let through N times the limit. This one counts in the
database (storage/rates.py): fixed windows of `window_s`, with the previous window's count
carried in proportion to how much of it still lies inside the sliding window (the usual
two-bucket estimate of a sliding log), one notice per window for whichever worker is first.
If the database cannot answer, the worker's own limiter decides (a limit is a courtesy;
answering must not depend on it).
"""
from __future__ import annotations

import logging
import math
import time

from bots.chat.ratelimit import RateLimiter, Verdict
from storage.rates import RateStore

log = logging.getLogger(__name__)


class SharedRateLimiter:
    def __init__(self, rates: RateStore, local: RateLimiter, clock=time.time):
        self.rates = rates
        self.local = local            # this worker's own view: peek() and the fallback
        self.clock = clock
        self._swept = 0.0

    @property
    def window_s(self) -> float:
        return self.local.window_s

    async def check(self, key: tuple) -> Verdict:
        """Record an event for `key` across workers: allowed, or over (notify once per window)."""
        local = self.local.check(key)
        now, w = self.clock(), self.window_s
        start = math.floor(now / w) * w
        name = ":".join(str(part) for part in key)
        try:
            carried = int((await self.rates.events(name, start - w)) * (1.0 - (now - start) / w))
            if await self.rates.admit(name, start, self.local.max_events - carried):
                verdict = Verdict(True)
            else:
                verdict = Verdict(False, await self.rates.notice(name, start, now), max(0.0, start + w - now))
            if now - self._swept >= w:
                self._swept = now
                await self.rates.forget(before=start - w)
            return verdict
        except Exception as exc:
            log.warning("rate limit: the shared count is unavailable (%s); this worker's own count decides",
                        type(exc).__name__)
            return local
