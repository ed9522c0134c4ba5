"""Who and where: chats (a thread or forum topic is its own chat), users, a chat's consent
to training and its persona.

Every platform id is stored as TEXT so Telegram ints and Discord snowflakes compare the
same way.
"""
from __future__ import annotations

import time

from storage.protocol import StorageBackend


class Chats:
    """The chats and users tables."""

    def __init__(self, db: StorageBackend) -> None:
        self.db = db

    async def chat(self, platform: str, platform_chat_id: str | int, *, thread_id: str | int = "",
                   type: str = "private", title: str | None = None) -> int:
        """The chats.id for this chat (created on first sight; title kept current)."""
        key = (platform, str(platform_chat_id), str(thread_id or ""))
        row = await self.db.fetchone(
            "SELECT id, title FROM chats WHERE platform = ? AND platform_chat_id = ? AND thread_id = ?", key)
        if row is not None and (title is None or row["title"] == title):
            return row["id"]  # the common case needs no write lock
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO chats (platform, platform_chat_id, thread_id, type, title, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (platform, platform_chat_id, thread_id) "
                "DO UPDATE SET title = COALESCE(excluded.title, chats.title) RETURNING id",
                (*key, type, title, time.time()))
        return list(rows)[0][0]

    async def user(self, platform: str, platform_user_id: str | int, *, name: str | None = None) -> int:
        """The users.id for this user (created on first sight; name kept current)."""
        key = (platform, str(platform_user_id))
        row = await self.db.fetchone(
            "SELECT id, name FROM users WHERE platform = ? AND platform_user_id = ?", key)
        if row is not None and (name is None or row["name"] == name):
            return row["id"]
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "INSERT INTO users (platform, platform_user_id, name, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (platform, platform_user_id) "
                "DO UPDATE SET name = COALESCE(excluded.name, users.name) RETURNING id",
                (*key, name, time.time()))
        return list(rows)[0][0]

    async def set_consent(self, chat_id: int, consent: bool) -> None:
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE chats SET consent = ? WHERE id = ?", (int(consent), chat_id))

    async def consent(self, chat_id: int) -> bool:
        """Whether this chat's messages may be used for training (chats opt in by default)."""
        row = await self.db.fetchone("SELECT consent FROM chats WHERE id = ?", (chat_id,))
        return True if row is None else bool(row[0])

    async def set_persona(self, chat_id: int, persona: str | None) -> None:
        """A chat's own system prompt (/persona); None goes back to the configured default."""
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE chats SET persona = ? WHERE id = ?", (persona, chat_id))

    async def persona(self, chat_id: int) -> str | None:
        """The chat's own persona, or None when it has none."""
        row = await self.db.fetchone("SELECT persona FROM chats WHERE id = ?", (chat_id,))
        return None if row is None else row[0]

    async def consenting_chats(self, chat_ids) -> set[int]:
        """Which of these chats still allow training (the others opted out meanwhile)."""
        ids = sorted({int(i) for i in chat_ids})
        if not ids:
            return set()
        rows = await self.db.fetchall(
            f"SELECT id FROM chats WHERE consent = 1 AND id IN ({','.join('?' * len(ids))})", ids)
        return {row[0] for row in rows}
