"""What learning needs to be trustworthy: per-user consent, the rows a run may read, and the
lineage of every model version (which users' and which messages' data it was trained on,
and whether a /forget has tainted it).

Lineage is keyed by the platform user id, not by users.id or message rows, because /forget
deletes the messages: the record of who a version learned from must outlive them.
"""
from __future__ import annotations

import bisect
import time

from storage.protocol import StorageBackend


class TrustStore:
    """Consent, the training read and lineage.

    `reader`: a second connection to the same database for the training read (its own
    thread and lock; in WAL mode readers and the writer do not wait for each other), so a
    large export never holds up the messages the bot is storing. Defaults to `db`."""

    def __init__(self, db: StorageBackend, reader: StorageBackend | None = None) -> None:
        self.db = db
        self.reader = reader or db

    # --- per-user consent ---------------------------------------------------------------
    async def set_user_consent(self, platform: str, platform_user_id: str | int, consent: bool) -> None:
        """The user's own /optout (or /optin): their messages, in every chat, stay out of training."""
        key = (platform, str(platform_user_id))
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO users (platform, platform_user_id, created_at, consent) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (platform, platform_user_id) DO UPDATE SET consent = excluded.consent",
                (*key, time.time(), int(consent)))

    async def user_consent(self, platform: str, platform_user_id: str | int) -> bool:
        row = await self.db.fetchone("SELECT consent FROM users WHERE platform = ? AND platform_user_id = ?",
                                     (platform, str(platform_user_id)))
        return True if row is None else bool(row[0])

    # --- what a run may read --------------------------------------------------------------
    async def training_rows(self, *, after_message_id: int = 0) -> list[dict]:
        """Every message of the opted-in chats that have something after `after_message_id`,
        with its user's key, consent and first-seen time (user_since) and its reset epoch; oldest first.

        Read on `reader`, linear in messages + resets whatever /reset spam did: each
        message's epoch (how many resets came before it) is found by bisecting its chat's
        reset points, not by a per-message COUNT (issue 25 item 2). The resets are read
        after the rows: a reset made in between lies after every row read, so it counts for
        none of them."""
        rows = await self.reader.fetchall(
            "SELECT m.id, m.chat_id, m.role, m.text, m.created_at, m.status, m.model_version, "
            "  u.platform || ':' || u.platform_user_id AS user, COALESCE(u.consent, 1) AS consent, "
            "  COALESCE(u.created_at, 0) AS user_since "
            "FROM messages m JOIN chats c ON c.id = m.chat_id LEFT JOIN users u ON u.id = m.user_id "
            "WHERE c.consent = 1 AND m.chat_id IN (SELECT chat_id FROM messages WHERE id > ?) "
            "ORDER BY m.id", (after_message_id,))
        resets: dict[int, list[int]] = {}
        for chat, at in await self.reader.fetchall(
                "SELECT chat_id, at_message_id FROM context_resets "
                "WHERE chat_id IN (SELECT chat_id FROM messages WHERE id > ?) ORDER BY chat_id, at_message_id",
                (after_message_id,)):
            resets.setdefault(chat, []).append(at)
        out = []
        for r in rows:
            row = dict(r)
            row["epoch"] = bisect.bisect_left(resets.get(row["chat_id"], ()), row["id"])   # resets with at < id
            out.append(row)
        return out

    async def count_new_user_messages(self, *, after_message_id: int = 0) -> int:
        """New material: 'ok' user messages (no commands) of opted-in chats and users."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id LEFT JOIN users u ON u.id = m.user_id "
            "WHERE c.consent = 1 AND COALESCE(u.consent, 1) = 1 AND m.role = 'user' AND m.status = 'ok' "
            "AND m.text NOT LIKE '/%' AND m.id > ?", (after_message_id,))
        return row[0]

    # --- lineage ----------------------------------------------------------------------------
    async def record_lineage(self, version: str, users: dict[str, int], message_ids) -> None:
        """`users`: "platform:platform_user_id" -> how many of their messages it trained on."""
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO version_users (version, platform, platform_user_id, messages) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (version, platform, platform_user_id) DO UPDATE SET messages = excluded.messages",
                [(version, *u.split(":", 1), n) for u, n in users.items()])
            await conn.executemany("INSERT OR IGNORE INTO version_messages (version, message_id) VALUES (?, ?)",
                                   [(version, int(i)) for i in message_ids])

    async def versions_trained_on(self, platform: str, platform_user_id: str | int) -> set[str]:
        rows = await self.db.fetchall(
            "SELECT version FROM version_users WHERE platform = ? AND platform_user_id = ?",
            (platform, str(platform_user_id)))
        return {r[0] for r in rows}

    async def trained_message_ids(self, version: str) -> set[int]:
        rows = await self.db.fetchall("SELECT message_id FROM version_messages WHERE version = ?", (version,))
        return {r[0] for r in rows}

    async def lineage(self) -> dict[str, dict]:
        """version -> {"users": n, "messages": n} of its own training data."""
        out: dict[str, dict] = {}
        for r in await self.db.fetchall("SELECT version, COUNT(*), SUM(messages) FROM version_users GROUP BY version"):
            out[r[0]] = {"users": r[1], "messages": r[2] or 0}
        return out

    async def taint(self, versions, reason: str) -> list[str]:
        """Mark versions as trained on forgotten data; returns those newly tainted."""
        new = []
        async with self.db.transaction() as conn:
            for v in sorted(set(versions)):
                cur = await conn.execute("INSERT OR IGNORE INTO version_taint (version, reason, tainted_at) "
                                         "VALUES (?, ?, ?)", (v, reason, time.time()))
                if cur.rowcount:
                    new.append(v)
        return new

    async def tainted(self) -> dict[str, str]:
        rows = await self.db.fetchall("SELECT version, reason FROM version_taint")
        return {r[0]: r[1] for r in rows}
