"""What several workers on one database agree on: who is alive, who handles which platform
update, who holds a job's lease, and a few shared facts.

Every decision is one statement on a unique key (INSERT … ON CONFLICT, UPDATE … WHERE …
RETURNING), so it is atomic on PostgreSQL under concurrent workers and on SQLite alike;
nothing here reads a row and then writes on the strength of what it read.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

CLAIM_MINE, CLAIM_TAKEN, CLAIM_DONE = "mine", "taken", "done"
CLAIM_TAKEN_OVER = "taken over"    # mine now, from a worker that died with it unfinished


@dataclass
class Worker:
    id: str
    host: str
    pid: int
    started_at: float
    last_seen: float
    version: str | None
    stopped_at: float | None

    def alive(self, now: float, stale_after: float) -> bool:
        return self.stopped_at is None and now - self.last_seen <= stale_after


class ClusterStore:
    """The workers, update_claims, leases and cluster_state tables."""

    def __init__(self, db) -> None:
        self.db = db

    # --- workers --------------------------------------------------------------------------
    async def heartbeat(self, worker: str, host: str, pid: int, version: str | None) -> None:
        """Register the worker on first call; then refresh its last_seen and served version."""
        now = time.time()
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO workers (id, host, pid, started_at, last_seen, version) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, version = excluded.version, "
                "stopped_at = NULL", (worker, host, pid, now, now, version))

    async def stopped(self, worker: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE workers SET stopped_at = ? WHERE id = ?", (time.time(), worker))

    async def workers(self, *, since: float = 0.0) -> list[Worker]:
        """Workers seen since `since`, newest start first."""
        rows = await self.db.fetchall(
            "SELECT id, host, pid, started_at, last_seen, version, stopped_at FROM workers "
            "WHERE last_seen >= ? ORDER BY started_at DESC", (since,))
        return [Worker(*tuple(r)) for r in rows]

    # --- update claims --------------------------------------------------------------------
    async def claim(self, platform: str, key: str, worker: str, *, stale_after: float,
                    payload: str | None = None) -> str:
        """CLAIM_MINE: handle it. CLAIM_DONE: handled already (by anyone). CLAIM_TAKEN: another
        live worker has it. A claim whose worker stopped or fell silent for `stale_after`
        seconds, and is not done, is taken over: CLAIM_TAKEN_OVER (the caller deals with what
        the dead worker left half done, such as a reply it never confirmed)."""
        now = time.time()
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO update_claims (platform, update_key, worker, claimed_at, payload) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (platform, update_key) DO NOTHING RETURNING worker",
                (platform, key, worker, now, payload))
            if list(rows):
                return CLAIM_MINE
            rows = list(await conn.execute_fetchall(
                "UPDATE update_claims SET claimed_at = ? WHERE platform = ? AND update_key = ? AND done_at IS NULL "
                "AND worker = ? RETURNING worker", (now, platform, key, worker)))
            if rows:
                return CLAIM_MINE
            rows = list(await conn.execute_fetchall(
                "UPDATE update_claims SET worker = ?, claimed_at = ? "
                "WHERE platform = ? AND update_key = ? AND done_at IS NULL AND worker NOT IN ("
                "  SELECT id FROM workers WHERE stopped_at IS NULL AND last_seen >= ?) RETURNING worker",
                (worker, now, platform, key, now - stale_after)))
            if rows:
                return CLAIM_TAKEN_OVER
            done = list(await conn.execute_fetchall(
                "SELECT done_at FROM update_claims WHERE platform = ? AND update_key = ?", (platform, key)))
        return CLAIM_DONE if done and done[0][0] is not None else CLAIM_TAKEN

    async def claim_state(self, platform: str, key: str) -> tuple[str, float | None, float | None] | None:
        """(worker, stored_at, done_at) of the claim, or None."""
        row = await self.db.fetchone("SELECT worker, stored_at, done_at FROM update_claims "
                                     "WHERE platform = ? AND update_key = ?", (platform, key))
        return None if row is None else tuple(row)

    async def mark(self, platform: str, key: str, worker: str, *, done: bool = False) -> None:
        """The update's message is stored (the platform may be acknowledged), or it is fully done."""
        column = "done_at" if done else "stored_at"
        async with self.db.transaction() as conn:
            await conn.execute(f"UPDATE update_claims SET {column} = COALESCE({column}, ?) "
                               "WHERE platform = ? AND update_key = ? AND worker = ?", (time.time(), platform, key,
                                                                                       worker))

    async def orphaned(self, platform: str, worker: str, *, stale_after: float, limit: int = 50) -> list[tuple]:
        """Take over claims left unfinished by workers that stopped or fell silent; returns
        (update_key, payload) of each, oldest first, now claimed by `worker`."""
        now = time.time()
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE update_claims SET worker = ?, claimed_at = ? WHERE platform = ? AND done_at IS NULL "
                "AND worker != ? AND worker NOT IN (SELECT id FROM workers WHERE stopped_at IS NULL "
                "AND last_seen >= ?) AND claimed_at < ? RETURNING update_key, payload",
                (worker, now, platform, worker, now - stale_after, now - stale_after))
        return sorted(((r[0], r[1]) for r in rows), key=lambda r: int(r[0]) if r[0].isdigit() else 0)[:limit]

    async def forget_claims(self, *, older_than: float) -> int:
        """Done claims past redelivery age go (Telegram keeps an update at most 24 h)."""
        async with self.db.transaction() as conn:
            cur = await conn.execute("DELETE FROM update_claims WHERE done_at IS NOT NULL AND done_at < ?",
                                     (older_than,))
        return cur.rowcount

    async def fail_pending_replies(self, platform: str, platform_chat_id: str | None, platform_message_id: str) -> int:
        """Replies a dead worker stored for this user message but never confirmed sent become
        'failed', so the worker that takes the message over answers it. No `platform_chat_id`:
        the message id alone names it (Discord's snowflakes are unique across channels)."""
        chat = "" if platform_chat_id is None else "AND c.platform_chat_id = ? "
        params = (platform,) + (() if platform_chat_id is None else (platform_chat_id,)) + (platform_message_id,)
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE messages SET status = 'failed' WHERE role = 'bot' AND status = 'pending' AND reply_to_id IN ("
                "  SELECT m.id FROM messages m JOIN chats c ON c.id = m.chat_id WHERE c.platform = ? "
                f"  {chat}AND m.platform_message_id = ? AND m.role = 'user')", params)
        return cur.rowcount

    # --- leases ---------------------------------------------------------------------------
    async def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take or renew lease `name` for `ttl` seconds; False while someone else holds it."""
        now = time.time()
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO leases (name, holder, acquired_at, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
                "acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at "
                "ELSE excluded.acquired_at END "
                "WHERE leases.holder = excluded.holder OR leases.expires_at < ? RETURNING holder",
                (name, holder, now, now + ttl, now))
        return bool(list(rows))

    async def release(self, name: str, holder: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def holder(self, name: str) -> str | None:
        row = await self.db.fetchone("SELECT holder FROM leases WHERE name = ? AND expires_at >= ?",
                                     (name, time.time()))
        return None if row is None else row[0]

    # --- shared facts -----------------------------------------------------------------------
    async def set_state(self, key: str, value: str) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("INSERT INTO cluster_state (key, value, updated_at) VALUES (?, ?, ?) "
                               "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                               (key, value, time.time()))

    async def state(self, key: str) -> str | None:
        row = await self.db.fetchone("SELECT value FROM cluster_state WHERE key = ?", (key,))
        return None if row is None else row[0]
