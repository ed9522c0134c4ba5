"""What the bot said and heard: logging, per-chat context, /reset, /forget and export.

Every platform id is stored as TEXT so Telegram ints and Discord snowflakes compare the
same way. A thread or forum topic is its own chat, so it keeps its own context.
"""
from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass, field

from storage.db import Database
from storage.feedback import delete_user_rows

ROLES = ("user", "bot")
# ok: sent / heard; pending: a reply not yet confirmed sent; failed: never reached the chat;
# limited: a user message over the rate limit (stored, never answered, never trained on).
STATUSES = ("ok", "pending", "failed", "limited")
AUDIT_ARGS_MAX = 200   # characters of an admin command's arguments kept in the audit table
DIALOGUE_GAP_SECONDS = 3600  # a longer silence starts a new conversation


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


@dataclass
class StoredDialogue:
    """One exported conversation: its turns (same-side messages merged) and where it lies in the log."""

    chat_id: int
    turns: list[str]
    first_message_id: int
    last_message_id: int
    message_ids: list[int] = field(default_factory=list, compare=False)  # every message in it


def _id(value: str | int | None) -> str | None:
    return None if value is None else str(value)


class Conversations:
    """The conversation tables, behind one shared Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- chats and users -------------------------------------------------------------

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

    # --- messages ----------------------------------------------------------------------

    async def log_message(self, chat_id: int, role: str, text: str, *, user_id: int | None = None,
                          platform_message_id: str | int | None = None, reply_to: str | int | None = None,
                          model_version: str | None = None, status: str = "ok",
                          reply_to_id: int | None = None) -> int:
        """Store one message and return its id; it is committed when this returns.

        `reply_to_id` links a bot reply to the stored user message it answers (/forget uses it)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "INSERT INTO messages (chat_id, user_id, role, text, platform_message_id, "
                "reply_to_platform_id, model_version, status, created_at, reply_to_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (chat_id, user_id, role, text, _id(platform_message_id), _id(reply_to),
                 model_version, status, time.time(), reply_to_id))
            return cursor.lastrowid

    async def set_status(self, message_id: int, status: str, *, platform_message_id: str | int | None = None) -> None:
        """Mark a bot reply sent ('ok') or 'failed', and remember the id the platform gave it."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {status!r}")
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE messages SET status = ?, platform_message_id = COALESCE(?, platform_message_id) "
                "WHERE id = ?", (status, _id(platform_message_id), message_id))

    async def seen_message(self, chat_id: int, platform_message_id: str | int) -> tuple[int, bool] | None:
        """(messages.id, handled) when this user message is already stored, else None.

        A platform may deliver a message twice (Telegram redelivers what was not acknowledged
        before a restart); `handled` says it needs no answer: it was rate-limited, or a reply
        to it was sent or is pending (start-up recovery deals with those)."""
        row = await self.db.fetchone(
            "SELECT m.id, m.status != 'ok' OR EXISTS (SELECT 1 FROM messages r WHERE r.reply_to_id = m.id "
            "  AND r.status IN ('ok', 'pending')) FROM messages m "
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

    async def forget_user(self, platform: str, platform_user_id: str | int) -> int:
        """Delete the user's messages in every chat of the platform, and the bot replies to them.

        Returns how many of the user's messages were deleted. The ids are recorded in
        `forgotten` so data exported before now can be purged too.
        """
        key = (platform, str(platform_user_id))
        async with self.db.transaction() as conn:
            own = [row[0] for row in await conn.execute_fetchall(
                "SELECT m.id FROM messages m JOIN users u ON u.id = m.user_id "
                "WHERE u.platform = ? AND u.platform_user_id = ?", key)]
            # The bot's replies are linked to the user message they answer (reply_to_id), so
            # interleaved group messages never make us delete someone else's reply.
            replies = [row[0] for row in await conn.execute_fetchall(
                "SELECT n.id FROM messages m JOIN users u ON u.id = m.user_id "
                "JOIN messages n ON n.reply_to_id = m.id "
                "WHERE u.platform = ? AND u.platform_user_id = ? AND n.role = 'bot'", key)]
            deleted = sorted(set(own) | set(replies))
            # Titles derived from the user ("DM with <name>") go too: private chats they wrote in.
            await conn.execute(
                "UPDATE chats SET title = NULL WHERE type = 'private' AND id IN ("
                " SELECT m.chat_id FROM messages m JOIN users u ON u.id = m.user_id"
                " WHERE u.platform = ? AND u.platform_user_id = ?)", key)
            await conn.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in deleted])
            await delete_user_rows(conn, *key)  # their reactions on any reply go too
            await conn.execute("UPDATE users SET name = NULL WHERE platform = ? AND platform_user_id = ?", key)
            await conn.execute(
                "INSERT INTO forgotten (platform, platform_user_id, forgotten_at, message_ids) VALUES (?, ?, ?, ?)",
                (*key, time.time(), json.dumps(deleted)))
        await self.db.compact_wal()  # secure_delete zeroed the rows; now flush the old WAL frames too
        return len(own)

    async def forgotten_message_ids(self) -> set[int]:
        """Every message id ever removed by forget_user (ids are never reused)."""
        rows = await self.db.fetchall("SELECT message_ids FROM forgotten")
        return {i for row in rows for i in json.loads(row[0])}

    # --- learning loop -----------------------------------------------------------------

    async def export_dialogues(self, *, after_message_id: int = 0, min_turns: int = 2) -> list[StoredDialogue]:
        """Opted-in conversations for training, ordered by their last message id.

        A chat's history is cut at every /reset and at silences over an hour; consecutive
        messages from the same side are merged into one turn.
        """
        # Each message's epoch (how many /resets came before it) is found by bisecting the
        # chat's reset points here, not by a per-message COUNT in SQL: the cost must not grow
        # with messages x resets while the shared connection is busy (issue 12, item 3).
        resets: dict[int, list[int]] = {}
        for chat, at in await self.db.fetchall(
                "SELECT chat_id, at_message_id FROM context_resets "
                "WHERE chat_id IN (SELECT chat_id FROM messages WHERE id > ?) ORDER BY chat_id, at_message_id",
                (after_message_id,)):
            resets.setdefault(chat, []).append(at)
        rows = await self.db.fetchall(
            "SELECT m.id, m.chat_id, m.role, m.text, m.created_at "
            "FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.consent = 1 AND m.status = 'ok' "
            "  AND m.chat_id IN (SELECT chat_id FROM messages WHERE id > ?) "
            "ORDER BY m.chat_id, m.id", (after_message_id,))
        dialogues: list[StoredDialogue] = []
        current: StoredDialogue | None = None
        prev = None
        prev_epoch = None
        for row in rows:
            epoch = bisect.bisect_left(resets.get(row["chat_id"], ()), row["id"])   # resets with at < id
            starts_new = (prev is None or row["chat_id"] != prev["chat_id"] or epoch != prev_epoch
                          or row["created_at"] - prev["created_at"] > DIALOGUE_GAP_SECONDS)
            if starts_new:
                current = StoredDialogue(row["chat_id"], [row["text"]], row["id"], row["id"])
                dialogues.append(current)
            elif row["role"] == prev["role"]:
                current.turns[-1] += "\n" + row["text"]
                current.last_message_id = row["id"]
            else:
                current.turns.append(row["text"])
                current.last_message_id = row["id"]
            current.message_ids.append(row["id"])
            prev, prev_epoch = row, epoch
        kept = [d for d in dialogues if len(d.turns) >= min_turns and d.last_message_id > after_message_id]
        return sorted(kept, key=lambda d: d.last_message_id)

    async def count_user_messages(self, *, after_message_id: int = 0) -> int:
        """New material for training: user messages in opted-in chats after the given id."""
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.consent = 1 AND m.role = 'user' AND m.status = 'ok' AND m.id > ?", (after_message_id,))
        return row[0]

    async def max_message_id(self) -> int:
        row = await self.db.fetchone("SELECT COALESCE(MAX(id), 0) FROM messages")
        return row[0]

    async def consenting_chats(self, chat_ids) -> set[int]:
        """Which of these chats still allow training (the others opted out meanwhile)."""
        ids = sorted({int(i) for i in chat_ids})
        if not ids:
            return set()
        rows = await self.db.fetchall(
            f"SELECT id FROM chats WHERE consent = 1 AND id IN ({','.join('?' * len(ids))})", ids)
        return {row[0] for row in rows}

    # --- training runs and model versions (the learning loop's record) ---------------------

    async def start_training_run(self, trigger: str, data: dict | None = None) -> int:
        """A new 'running' row; returns its id."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "INSERT INTO training_runs (trigger, started_at, status, data_json) VALUES (?, ?, 'running', ?)",
                (trigger, time.time(), json.dumps(data or {})))
            return cursor.lastrowid

    async def update_training_run(self, run_id: int, *, status: str | None = None, data: dict | None = None,
                                  losses: dict | None = None, decision: str | None = None,
                                  error: str | None = None, finished: bool = False) -> None:
        """Change the given fields (None leaves a field as it is); finished=True stamps finished_at."""
        sets, params = [], []
        for column, value in (("status", status), ("data_json", None if data is None else json.dumps(data)),
                              ("losses_json", None if losses is None else json.dumps(losses)),
                              ("decision", decision), ("error", error)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if finished:
            sets.append("finished_at = ?")
            params.append(time.time())
        if not sets:
            return
        async with self.db.transaction() as conn:
            await conn.execute(f"UPDATE training_runs SET {', '.join(sets)} WHERE id = ?", (*params, run_id))

    @staticmethod
    def _run_row(row) -> dict:
        out = dict(row)
        out["data"] = json.loads(out.pop("data_json") or "{}")
        out["losses"] = json.loads(out.pop("losses_json") or "{}")
        out["duration_s"] = (out["finished_at"] - out["started_at"]) if out["finished_at"] else None
        return out

    async def training_runs(self, limit: int = 10) -> list[dict]:
        """Newest first, JSON columns decoded (data, losses) and duration_s added."""
        rows = await self.db.fetchall("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
        return [self._run_row(row) for row in rows]

    async def training_run(self, run_id: int) -> dict | None:
        row = await self.db.fetchone("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        return None if row is None else self._run_row(row)

    async def interrupt_running_runs(self, reason: str) -> list[int]:
        """Mark rows still 'running' (their process died) as 'interrupted'; returns their ids."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE training_runs SET status = 'interrupted', error = ?, finished_at = ? "
                "WHERE status = 'running' RETURNING id", (reason, time.time()))
        return sorted(row[0] for row in rows)

    async def record_model_version(self, version: str, path: str, created_at: float, metrics: dict | None = None,
                                   note: str | None = None) -> None:
        """Insert or refresh a model_versions row (the registry on disk is the source of truth)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO model_versions (version, path, created_at, metrics_json, note) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (version) DO UPDATE SET path = excluded.path, metrics_json = excluded.metrics_json, "
                "note = excluded.note", (version, path, created_at, json.dumps(metrics or {}), note))

    async def model_versions(self) -> list[dict]:
        rows = await self.db.fetchall("SELECT * FROM model_versions ORDER BY version")
        return [{**dict(row), "metrics": json.loads(row["metrics_json"] or "{}")} for row in rows]

    async def replies_by_version(self) -> dict[str, int]:
        """How many logged bot replies each model version wrote."""
        rows = await self.db.fetchall(
            "SELECT model_version, COUNT(*) FROM messages WHERE role = 'bot' AND model_version IS NOT NULL "
            "GROUP BY model_version")
        return {row[0]: row[1] for row in rows}

    # --- admin -------------------------------------------------------------------------

    async def audit(self, platform: str, platform_user_id: str | int, command: str, args: str | None,
                    allowed: bool) -> None:
        """Record an admin command attempt, allowed or refused (arguments cut to AUDIT_ARGS_MAX)."""
        if args is not None and len(args) > AUDIT_ARGS_MAX:
            args = args[:AUDIT_ARGS_MAX - 1] + "…"
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO admin_audit (platform, platform_user_id, command, args, allowed, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (platform, str(platform_user_id), command, args, int(allowed), time.time()))

    async def recent_audit(self, limit: int = 20) -> list[dict]:
        """Newest first."""
        rows = await self.db.fetchall(
            "SELECT id, platform, platform_user_id, command, args, allowed, created_at "
            "FROM admin_audit ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(row), "allowed": bool(row["allowed"])} for row in rows]

    async def stats(self) -> dict:
        row = await self.db.fetchone(
            "SELECT (SELECT COUNT(*) FROM chats), (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM messages)")
        return {"chats": row[0], "users": row[1], "messages": row[2]}
