"""What each user told Mynah about themselves (name, pets, places, likes), per user.

The facts are extracted from the user's own messages by the chat service (bots/chat/memory.py)
and stored here by users.id, so whoever is speaking gets their own facts in the prompt and no
one else's. Some kinds hold one value (a name: saying a new one replaces the old), others
several (pets, likes), newest kept. /memory clear and /forget delete them (forget inside
Messages.forget_user's transaction, so a /forget re-applied to a restored backup removes them
too). Training never reads this table.
"""
from __future__ import annotations

import time

from storage.protocol import StorageBackend

# Kinds with one value per user: a new one replaces the old.
SINGLE = frozenset({"name", "home", "from", "age", "job"})
MAX_PER_KIND = 5        # of a many-valued kind, the newest kept
MAX_VALUE_CHARS = 80


async def delete_user_facts(conn, platform: str, platform_user_id: str) -> None:
    """Inside Messages.forget_user's transaction: the user's remembered facts go with them."""
    await conn.execute("DELETE FROM user_facts WHERE user_id IN "
                       "(SELECT id FROM users WHERE platform = ? AND platform_user_id = ?)",
                       (platform, str(platform_user_id)))


class Memory:
    """The user_facts table, behind the shared Database."""

    def __init__(self, db: StorageBackend) -> None:
        self.db = db

    async def remember(self, user_id: int, facts: list[tuple[str, str]]) -> int:
        """Store (kind, value) facts for users.id `user_id`; returns how many were new or changed."""
        changed = 0
        now = time.time()
        async with self.db.transaction() as conn:
            for kind, value in facts:
                value = value.strip()[:MAX_VALUE_CHARS]
                if not value:
                    continue
                if kind in SINGLE:
                    await conn.execute("DELETE FROM user_facts WHERE user_id = ? AND kind = ? AND value != ?",
                                       (user_id, kind, value))
                cursor = await conn.execute(
                    "INSERT INTO user_facts (user_id, kind, value, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (user_id, kind, value) DO UPDATE SET updated_at = excluded.updated_at",
                    (user_id, kind, value, now))
                changed += cursor.rowcount > 0
                await conn.execute(
                    "DELETE FROM user_facts WHERE user_id = ? AND kind = ? AND id NOT IN ("
                    " SELECT id FROM user_facts WHERE user_id = ? AND kind = ? ORDER BY updated_at DESC, id DESC"
                    " LIMIT ?)", (user_id, kind, user_id, kind, MAX_PER_KIND))
        return changed

    async def facts(self, platform: str, platform_user_id: str | int) -> list[tuple[str, str]]:
        """The user's (kind, value) facts, oldest first."""
        rows = await self.db.fetchall(
            "SELECT f.kind, f.value FROM user_facts f JOIN users u ON u.id = f.user_id "
            "WHERE u.platform = ? AND u.platform_user_id = ? ORDER BY f.updated_at, f.id",
            (platform, str(platform_user_id)))
        return [(row["kind"], row["value"]) for row in rows]

    async def clear(self, platform: str, platform_user_id: str | int) -> int:
        """Delete everything remembered about the user; returns how many facts went."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT COUNT(*) FROM user_facts WHERE user_id IN "
                "(SELECT id FROM users WHERE platform = ? AND platform_user_id = ?)",
                (platform, str(platform_user_id)))
            await delete_user_facts(conn, platform, str(platform_user_id))
        return rows[0][0] if rows else 0
