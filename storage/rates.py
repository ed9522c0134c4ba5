"""Per-user message counts in fixed windows, shared by every worker on one database.

A user whose messages a load balancer spreads over three workers must meet one rate limit,
not three. Each window's count is one row, raised by an atomic conditional upsert (only
while under the allowance), so two workers admitting the same user at once cannot both
take the last slot; a notice is claimed the same way, once per window.
"""
from __future__ import annotations


class RateStore:
    def __init__(self, db) -> None:
        self.db = db

    async def events(self, key: str, window_start: float) -> int:
        row = await self.db.fetchone("SELECT events FROM rate_windows WHERE key = ? AND window_start = ?",
                                     (key, window_start))
        return int(row[0]) if row is not None else 0

    async def admit(self, key: str, window_start: float, allowance: int) -> bool:
        """Count one event in the window if fewer than `allowance` are counted; whether it was."""
        if allowance < 1:
            return False
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO rate_windows (key, window_start, events) VALUES (?, ?, 1) "
                "ON CONFLICT (key, window_start) DO UPDATE SET events = rate_windows.events + 1 "
                "WHERE rate_windows.events < ? RETURNING events", (key, window_start, allowance))
        return bool(list(rows))

    async def notice(self, key: str, window_start: float, now: float) -> bool:
        """True for the first caller in this window: that worker tells the user to slow down."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO rate_windows (key, window_start, events, noticed_at) VALUES (?, ?, 0, ?) "
                "ON CONFLICT (key, window_start) DO UPDATE SET noticed_at = ? "
                "WHERE rate_windows.noticed_at IS NULL RETURNING key", (key, window_start, now, now))
        return bool(list(rows))

    async def forget(self, *, before: float) -> int:
        async with self.db.transaction() as conn:
            cur = await conn.execute("DELETE FROM rate_windows WHERE window_start < ?", (before,))
        return cur.rowcount
