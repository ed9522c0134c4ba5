"""What the bot said and heard: logging, per-chat context, /reset, /forget, pending
replies and redelivery checks. (What training may read is storage/trust.py's training_rows,
cut into dialogues by bots/learning/curate.py: one path for a run and for `mynah export`.)

Platform ids are TEXT (see storage/chats.py); a thread or forum topic is its own chat, so
it keeps its own context.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from storage.feedback import delete_user_rows
from storage.memory import delete_user_facts
from storage.ledger import ForgetLedger
from storage.db import StorageError, violates
from storage.protocol import StorageBackend

ROLES = ("user", "bot")
# ok: sent / heard; pending: a reply not yet confirmed sent; failed: never reached the chat;
# limited: a user message over the rate limit (stored, never answered, never trained on).
STATUSES = ("ok", "pending", "failed", "limited")


@dataclass
class StoredTurn:
    """One logged message as chat context: role "user" or "bot", and its text."""

    role: str
    text: str


@dataclass
class PendingReply:
    """A bot reply stored but never confirmed sent (the process died mid-send)."""

    id: int
    platform: str
    platform_chat_id: str
    thread_id: str
    text: str
    reply_to_platform_id: str | None
    created_at: float


@dataclass
class RecentChat:
    """A chat with a recent conversation, and the newest platform message id stored in it."""

    platform_chat_id: str
    thread_id: str
    newest_platform_id: int | None


class MessageGone(StorageError):
    """The stored message a reply answers was forgotten (/forget) while the reply was written."""


_INSERT = ("INSERT INTO messages (chat_id, user_id, role, text, platform_message_id, reply_to_platform_id, "
           "model_version, status, created_at, reply_to_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _id(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def _row(chat_id, role, text, user_id, platform_message_id, reply_to, model_version, status, reply_to_id) -> tuple:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
    return (chat_id, user_id, role, text, _id(platform_message_id), _id(reply_to), model_version, status,
            time.time(), reply_to_id)


class Messages:
    """The messages and context_resets tables (and the `forgotten` record /forget keeps).

    `ledger`: where /forget is also noted outside the database (hash and time), so a
    restored backup can be made to forget again (storage/ledger.py); None keeps no ledger."""

    def __init__(self, db: StorageBackend, ledger: ForgetLedger | None = None) -> None:
        self.db = db
        self.ledger = ledger

    async def log_message(self, chat_id: int, role: str, text: str, *, user_id: int | None = None,
                          platform_message_id: str | int | None = None, reply_to: str | int | None = None,
                          model_version: str | None = None, status: str = "ok",
                          reply_to_id: int | None = None) -> int:
        """Store one message and return its id; it is committed when this returns.

        `reply_to_id` links a bot reply to the stored user message it answers (/forget uses it)."""
        row = _row(chat_id, role, text, user_id, platform_message_id, reply_to, model_version, status, reply_to_id)
        async with self.db.transaction() as conn:
            cursor = await conn.execute(_INSERT, row)
            return cursor.lastrowid

    async def log_once(self, chat_id: int, role: str, text: str, *, user_id: int | None = None,
                       platform_message_id: str | int | None = None, reply_to: str | int | None = None,
                       model_version: str | None = None, status: str = "ok",
                       reply_to_id: int | None = None) -> int | None:
        """`log_message`, unless the database already holds this user message (its platform id
        in this chat) or a reply sent or pending to the stored message `reply_to_id`: None then.

        One statement against the unique indexes of migration 9, so of two workers that handle
        one delivery at the same moment exactly one stores the message, and one its answer.
        Raises MessageGone when `reply_to_id` was forgotten (/forget) meanwhile."""
        row = _row(chat_id, role, text, user_id, platform_message_id, reply_to, model_version, status, reply_to_id)
        try:
            async with self.db.transaction() as conn:
                rows = list(await conn.execute_fetchall(_INSERT + " ON CONFLICT DO NOTHING RETURNING id", row))
        except Exception as e:
            if violates(e, "foreign key"):
                raise MessageGone(f"message {reply_to_id} was forgotten") from e
            raise
        return rows[0][0] if rows else None

    async def set_status(self, message_id: int, status: str, *, platform_message_id: str | int | None = None,
                         text: str | None = None, model_version: str | None = None) -> bool:
        """Mark a bot reply sent ('ok') or 'failed', and remember the id the platform gave it;
        `text` (and `model_version`) complete a reply stored while it was being written.
        False when it could not become 'ok' or 'pending' because the message it answers has
        another live reply (it is 'failed' then)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        try:
            async with self.db.transaction() as conn:
                await conn.execute(
                    "UPDATE messages SET status = ?, platform_message_id = COALESCE(?, platform_message_id), "
                    "text = COALESCE(?, text), model_version = COALESCE(?, model_version) WHERE id = ?",
                    (status, _id(platform_message_id), text, model_version, message_id))
        except Exception as e:
            if not violates(e, "unique"):
                raise
            # Another worker took the message over (this one was taken for dead), marked this
            # reply failed and holds its own answer: this one stays 'failed', the other is the
            # confirmed one, and the chat got the message twice (docs/SCALING.md).
            await self.set_status(message_id, "failed", platform_message_id=platform_message_id, text=text,
                                  model_version=model_version)
            return False
        return True

    async def seen_message(self, chat_id: int, platform_message_id: str | int) -> tuple[int, bool] | None:
        """(messages.id, handled) when this user message is already stored, else None.

        A platform may deliver a message twice (Telegram redelivers what was not acknowledged
        before a restart, a surviving worker re-handles a dead one's); `handled` says it needs
        no answer: it was rate-limited, a reply to it was sent or is pending (start-up recovery
        deals with those), or the chat moved on: a newer message of the chat is stored, whose
        reply has this one in its context, and a late answer would arrive out of order."""
        row = await self.db.fetchone(
            "SELECT m.id, m.status != 'ok' OR EXISTS (SELECT 1 FROM messages r WHERE r.reply_to_id = m.id "
            "  AND r.status IN ('ok', 'pending')) OR EXISTS (SELECT 1 FROM messages n WHERE n.chat_id = m.chat_id "
            "  AND n.role = 'user' AND n.id > m.id AND n.status = 'ok') FROM messages m "
            "WHERE m.chat_id = ? AND m.platform_message_id = ? AND m.role = 'user' ORDER BY m.id LIMIT 1",
            (chat_id, str(platform_message_id)))
        return None if row is None else (row[0], bool(row[1]))

    async def pending_replies(self, platform: str) -> list[PendingReply]:
        """Bot replies of `platform` still 'pending': the process stopped between storing and
        sending them (kill -9, power loss). Oldest first."""
        rows = await self.db.fetchall(
            "SELECT m.id, c.platform, c.platform_chat_id, c.thread_id, m.text, m.reply_to_platform_id, m.created_at "
            "FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE m.status = 'pending' AND m.role = 'bot' AND c.platform = ? ORDER BY m.id", (platform,))
        return [PendingReply(*tuple(row)) for row in rows]

    async def recent_chats(self, platform: str, *, since: float, limit: int) -> list[RecentChat]:
        """Chats of `platform` with a message stored since `since`, most recently active first
        (Discord catch-up reads their history after the newest stored message id)."""
        rows = await self.db.fetchall(
            "SELECT c.platform_chat_id, c.thread_id, MAX(CAST(m.platform_message_id AS INTEGER)), "
            "       MAX(m.created_at) AS last "
            "FROM chats c JOIN messages m ON m.chat_id = c.id WHERE c.platform = ? "
            "GROUP BY c.id HAVING MAX(m.created_at) >= ? ORDER BY last DESC LIMIT ?", (platform, since, limit))
        return [RecentChat(row[0], row[1], row[2]) for row in rows]

    async def is_bot_message(self, chat_id: int, platform_message_id: str | int) -> bool:
        """Whether a reply targets something the bot said in this chat."""
        row = await self.db.fetchone(
            "SELECT 1 FROM messages WHERE chat_id = ? AND platform_message_id = ? AND role = 'bot' LIMIT 1",
            (chat_id, str(platform_message_id)))
        return row is not None

    async def context(self, chat_id: int, max_turns: int) -> list[StoredTurn]:
        """The chat's last max_turns messages since its last reset, oldest first.

        Only 'ok' messages: a reply still pending (or failed) was never seen by the user, and
        a rate-limited message was never answered, so neither belongs in the conversation."""
        if max_turns <= 0:
            return []
        rows = await self.db.fetchall(
            "SELECT role, text FROM ("
            "  SELECT m.id, m.role, m.text FROM messages m JOIN chats c ON c.id = m.chat_id"
            "  WHERE m.chat_id = ? AND m.id > c.context_start_id AND m.status = 'ok'"
            "  ORDER BY m.id DESC LIMIT ?"
            ") AS recent ORDER BY id", (chat_id, max_turns))
        return [StoredTurn(row["role"], row["text"]) for row in rows]

    async def reset(self, chat_id: int) -> None:
        """Start a fresh context; nothing is deleted, so the history still trains the model."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT CASE WHEN newest > context_start_id THEN newest ELSE context_start_id END FROM ("
                "  SELECT COALESCE((SELECT MAX(id) FROM messages WHERE chat_id = ?), 0) AS newest, context_start_id "
                "  FROM chats WHERE id = ?) AS c", (chat_id, chat_id))
            rows = list(rows)
            if not rows:
                raise LookupError(f"no chat with id {chat_id}")
            at = rows[0][0]
            await conn.execute("UPDATE chats SET context_start_id = ? WHERE id = ?", (at, chat_id))
            await conn.execute(
                "INSERT INTO context_resets (chat_id, at_message_id, created_at) VALUES (?, ?, ?)",
                (chat_id, at, time.time()))

    async def forget_user(self, platform: str, platform_user_id: str | int, *, until: float | None = None) -> int:
        """Delete the user's messages in every chat of the platform, and the bot replies to them.

        Returns how many of the user's messages were deleted. The ids are recorded in
        `forgotten` so data exported before now can be purged too, and the request in the
        ledger first (so even a write that fails is re-applied by the next restore).
        `until`: only messages stored up to then (a ledger entry re-applied to a backup).
        """
        key = (platform, str(platform_user_id))
        if until is None and self.ledger is not None:
            await asyncio.to_thread(self.ledger.append, platform, key[1], time.time())
        upto = float("inf") if until is None else until    # no time limit for a /forget now
        async with self.db.transaction() as conn:
            own = [row[0] for row in await conn.execute_fetchall(
                "SELECT m.id FROM messages m JOIN users u ON u.id = m.user_id "
                "WHERE u.platform = ? AND u.platform_user_id = ? AND m.created_at <= ?", (*key, upto))]
            # The bot's replies are linked to the user message they answer (reply_to_id), so
            # interleaved group messages never make us delete someone else's reply.
            replies = [row[0] for row in await conn.execute_fetchall(
                "SELECT n.id FROM messages m JOIN users u ON u.id = m.user_id "
                "JOIN messages n ON n.reply_to_id = m.id "
                "WHERE u.platform = ? AND u.platform_user_id = ? AND m.created_at <= ? AND n.role = 'bot'",
                (*key, upto))]
            deleted = sorted(set(own) | set(replies))
            # Titles derived from the user ("DM with <name>") go too: private chats they wrote in.
            await conn.execute(
                "UPDATE chats SET title = NULL WHERE type = 'private' AND id IN ("
                " SELECT m.chat_id FROM messages m JOIN users u ON u.id = m.user_id"
                " WHERE u.platform = ? AND u.platform_user_id = ?)", key)
            await conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in deleted])
            await delete_user_rows(conn, *key)  # their reactions on any reply go too
            await delete_user_facts(conn, *key)  # and what Mynah remembered about them
            await conn.execute("UPDATE users SET name = NULL WHERE platform = ? AND platform_user_id = ?", key)
            await conn.execute(
                "INSERT INTO forgotten (platform, platform_user_id, forgotten_at, message_ids) VALUES (?, ?, ?, ?)",
                (*key, time.time() if until is None else until, json.dumps(deleted)))
        await self.db.compact_wal()  # secure_delete zeroed the rows; now flush the old WAL frames too
        return len(own)

    async def forgotten_message_ids(self) -> set[int]:
        """Every message id ever removed by forget_user (ids are never reused)."""
        rows = await self.db.fetchall("SELECT message_ids FROM forgotten")
        return {i for row in rows for i in json.loads(row[0])}

    # --- what training counts ----------------------------------------------------------

    async def count_user_messages(self, *, after_message_id: int = 0) -> int:
        """New material for training: user messages in opted-in chats after the given id."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.consent = 1 AND m.role = 'user' AND m.status = 'ok' AND m.id > ?", (after_message_id,))
        return row[0]

    async def max_message_id(self) -> int:
        row = await self.db.fetchone("SELECT COALESCE(MAX(id), 0) FROM messages")
        return row[0]

    async def replies_by_version(self) -> dict[str, int]:
        """How many logged bot replies each model version wrote."""
        rows = await self.db.fetchall(
            "SELECT model_version, COUNT(*) FROM messages WHERE role = 'bot' AND model_version IS NOT NULL "
            "GROUP BY model_version")
        return {row[0]: row[1] for row in rows}

    async def stats(self) -> dict:
        row = await self.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM chats), (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM messages)")
        return {"chats": row[0], "users": row[1], "messages": row[2]}
