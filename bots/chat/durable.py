"""Writes on the message path that must not be lost: retried with back-off until storage is back.

A backup tool or another process can hold SQLite's write lock for longer than the busy
timeout, and a full disk refuses writes until someone frees space. Neither is a reason to
drop a user's message: `WriteRetry.run` keeps trying (0.5 s, 1 s, 2 s … up to `max_delay`
between attempts), says so in the log, and returns once the write went through. Meanwhile
the platform's delivery is not acknowledged (a platform that redelivers does so after a restart), so the
message is never lost, only late. Only `abandon()` (the process is stopping) ends the wait,
with `StorageUnavailable`; the message then stays unacknowledged and comes back next start.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from storage.db import StorageError, TransientStorageError

log = logging.getLogger(__name__)


class StorageUnavailable(StorageError):
    """Storage stayed unavailable until the process stopped; nothing was stored."""


def transient(exc: BaseException) -> bool:
    """Locked, busy, full or an I/O hiccup: worth retrying. A constraint or SQL error is a bug."""
    if isinstance(exc, StorageUnavailable):
        return False
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, StorageError):
        return "locked" in str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(word in text for word in ("locked", "busy", "full", "i/o", "disk"))
    return False


class WriteRetry:
    def __init__(self, first_delay: float = 0.5, max_delay: float = 30.0):
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._abandoned: asyncio.Event | None = None
        self.waiting = 0          # writes currently waiting for storage (for /status and tests)

    def abandon(self) -> None:
        """The process is stopping: writes still waiting give up (their messages stay unacknowledged)."""
        self._event().set()

    def _event(self) -> asyncio.Event:
        if self._abandoned is None:
            self._abandoned = asyncio.Event()
        return self._abandoned

    async def run(self, what: str, write):
        """`await write()` until it succeeds; transient storage errors are retried forever."""
        delay, started, attempt = self.first_delay, time.monotonic(), 0
        while True:
            try:
                result = await write()
            except Exception as exc:
                if not transient(exc):
                    raise
                attempt += 1
                if self._event().is_set():
                    raise StorageUnavailable(f"storage unavailable while stopping; {what} not stored") from exc
                log.warning("storage: %s failed (%s); held, not acknowledged; attempt %d, retrying in %.1f s",
                            what, exc, attempt, delay)
                self.waiting += 1
                try:
                    await asyncio.wait_for(self._event().wait(), delay)
                except TimeoutError:
                    pass
                finally:
                    self.waiting -= 1
                delay = min(delay * 2, self.max_delay)
                continue
            if attempt:
                log.warning("storage: %s stored after %d failed attempt(s), %.0f s late", what, attempt,
                            time.monotonic() - started)
            return result
