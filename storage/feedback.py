"""How people reacted to the bot's replies: one `feedback` row per (reply, user, signal).

Two kinds of signal, both tied to the logged bot reply (and so to the model version that
wrote it):

* explicit: a reaction or a 👍/👎 button on the reply, stored when the platform reports it
  (`set_signals`); the adapters map emoji to -1/0/+1 with the configured table;
* implicit: derived later from the log itself (`derive_implicit`), once a reply's window
  has passed: did the user go on talking ("continued" 1/0), did someone /reset right after
  it ("reset" -1), was the answer a short negative like "what?" ("short_negative" -1).

Consent: nothing is stored or derived for a chat that opted out; /forget deletes the
user's rows (`delete_user_rows`, called inside Messages.forget_user's transaction),
and rows on a deleted reply go with it (ON DELETE CASCADE).

A reply's overall outcome (`outcome`): its explicit reactions decide when it has any, one
vote per person (each user's reactions count as the sign of their sum; the votes' sum
> 0 positive, < 0 negative, 0 neutral), so four emoji from one user never outweigh three
users' 👎; otherwise a reset or a short negative makes it
negative, a continuation positive, silence neutral.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from storage.protocol import StorageBackend

KINDS = ("explicit", "implicit")
DIALOGUE_GAP_SECONDS = 3600  # as in bots/learning/curate.py: a longer silence starts a new conversation
SHORT_NEGATIVES = ("what", "huh", "wtf", "what?", "that makes no sense", "makes no sense", "no sense",
                   "nonsense", "what are you talking about", "i don't understand", "i dont understand",
                   "that's not what i asked", "thats not what i asked", "stop", "you're not making sense",
                   "wrong", "bad bot", "what do you mean", "?")
_PUNCT = re.compile(r"[\s.!?,…]+$")


def is_short_negative(text: str, phrases=SHORT_NEGATIVES) -> bool:
    """"what?", "??", "that makes no sense": a short reply that says the bot made no sense."""
    raw = (text or "").strip().lower()
    if not raw or len(raw) > 40:
        return False
    if set(raw) <= {"?", "!", "."} and "?" in raw:
        return True
    norm = _PUNCT.sub("", raw)
    return norm in {_PUNCT.sub("", p.lower()) for p in phrases}


@dataclass
class ReplyScore:
    """One bot reply and what its feedback says."""

    message_id: int
    chat_id: int
    version: str
    created_at: float
    explicit_sum: int = 0
    explicit_count: int = 0
    positive_reactions: int = 0
    negative_reactions: int = 0
    implicit_negative: bool = False
    continued: int | None = None          # None: the window has not been evaluated yet
    conversation_length: int = 0          # messages in the conversation this reply belongs to

    @property
    def evaluated(self) -> bool:
        return self.explicit_count > 0 or self.continued is not None

    @property
    def outcome(self) -> int:
        """+1 positive, -1 negative, 0 neutral (or not evaluated)."""
        if self.explicit_count:
            return (self.explicit_sum > 0) - (self.explicit_sum < 0)
        if self.implicit_negative:
            return -1
        return 1 if self.continued == 1 else 0


@dataclass
class VersionFeedback:
    """Per-version counts (`summarize`)."""

    version: str
    replies: int = 0
    evaluated: int = 0
    positive: int = 0
    negative: int = 0
    reactions: int = 0
    continued: int = 0
    continuation_base: int = 0            # replies whose continuation window was evaluated
    conversation_lengths: list[int] = field(default_factory=list)

    @property
    def mean_conversation_length(self) -> float | None:
        ls = self.conversation_lengths
        return sum(ls) / len(ls) if ls else None


def summarize(scores: list[ReplyScore]) -> dict[str, VersionFeedback]:
    """Aggregate reply scores by model version."""
    out: dict[str, VersionFeedback] = {}
    for s in scores:
        v = out.setdefault(s.version, VersionFeedback(s.version))
        v.replies += 1
        v.reactions += s.explicit_count
        if s.conversation_length:
            v.conversation_lengths.append(s.conversation_length)
        if not s.evaluated:
            continue
        v.evaluated += 1
        v.positive += s.outcome > 0
        v.negative += s.outcome < 0
        if s.continued is not None:
            v.continuation_base += 1
            v.continued += s.continued
    return out


async def delete_user_rows(conn, platform: str, platform_user_id: str) -> None:
    """Inside Messages.forget_user's transaction: the user's feedback goes with them."""
    await conn.execute("DELETE FROM feedback WHERE user_id IN "
                       "(SELECT id FROM users WHERE platform = ? AND platform_user_id = ?)",
                       (platform, str(platform_user_id)))


class Feedback:
    """The feedback table, behind the shared Database."""

    def __init__(self, db: StorageBackend) -> None:
        self.db = db

    async def find_reply(self, platform: str, platform_chat_id, platform_message_id) -> tuple[int, int] | None:
        """(messages.id, chats.id) of the bot reply with this platform id, or None.

        The thread is not part of the key: a platform message id is unique within its chat.
        platform_chat_id None: by message id alone (Discord ids are unique everywhere)."""
        if platform_chat_id is None:
            row = await self.db.fetchone(
                "SELECT m.id, m.chat_id FROM messages m JOIN chats c ON c.id = m.chat_id WHERE c.platform = ? "
                "AND m.platform_message_id = ? AND m.role = 'bot' ORDER BY m.id DESC LIMIT 1",
                (platform, str(platform_message_id)))
            return None if row is None else (row[0], row[1])
        row = await self.db.fetchone(
            "SELECT m.id, m.chat_id FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.platform = ? AND c.platform_chat_id = ? AND m.platform_message_id = ? AND m.role = 'bot' "
            "ORDER BY m.id DESC LIMIT 1", (platform, str(platform_chat_id), str(platform_message_id)))
        return None if row is None else (row[0], row[1])

    async def set_signals(self, platform: str, platform_chat_id, platform_message_id, platform_user_id,
                          values: dict[str, int], *, clear: tuple[str, ...] = (), kind: str = "explicit",
                          user_name: str | None = None) -> int:
        """Replace this user's signals on a bot reply: rows whose signal matches a `clear`
        GLOB pattern go, `values` ({signal: -1/0/+1}) are written. Returns rows written;
        0 when the message is no bot reply or its chat opted out (then nothing is kept)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        bad = {s: v for s, v in values.items() if v not in (-1, 0, 1)}
        if bad:
            raise ValueError(f"feedback values must be -1, 0 or 1, got {bad}")
        found = await self.find_reply(platform, platform_chat_id, platform_message_id)
        if found is None:
            return 0
        message_id, chat_id = found
        async with self.db.transaction() as conn:
            if not await self._allowed(conn, chat_id, platform, str(platform_user_id)):
                return 0
            rows = await conn.execute_fetchall(
                "INSERT INTO users (platform, platform_user_id, name, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (platform, platform_user_id) DO UPDATE SET name = COALESCE(excluded.name, users.name) "
                "RETURNING id", (platform, str(platform_user_id), user_name, time.time()))
            user_id = list(rows)[0][0]
            for pattern in clear:
                await conn.execute("DELETE FROM feedback WHERE message_id = ? AND user_id = ? AND kind = ? "
                                   "AND signal GLOB ?", (message_id, user_id, kind, pattern))
            now = time.time()
            for signal, value in values.items():
                await conn.execute(
                    "INSERT INTO feedback (message_id, chat_id, user_id, kind, signal, value, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id, user_id, signal) "
                    "DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
                    (message_id, chat_id, user_id, kind, signal, value, now))
        return len(values)

    @staticmethod
    async def _allowed(conn, chat_id: int, platform: str, platform_user_id: str) -> bool:
        """Consent: the one place that says whether this user's feedback on this chat may be kept
        (the chat did not opt out, and neither did the user, anywhere)."""
        rows = list(await conn.execute_fetchall("SELECT consent FROM chats WHERE id = ?", (chat_id,)))
        if not (rows and rows[0][0]):
            return False
        user = list(await conn.execute_fetchall(
            "SELECT consent FROM users WHERE platform = ? AND platform_user_id = ?", (platform, platform_user_id)))
        return not user or bool(user[0][0])

    async def derive_implicit(self, window_s: float, *, now: float | None = None,
                              phrases=SHORT_NEGATIVES) -> int:
        """Write the implicit signals of every bot reply whose window has passed and that has
        none yet (opted-in chats only); returns how many replies were evaluated. Idempotent."""
        now = time.time() if now is None else now
        rows = await self.db.fetchall(
            "SELECT m.id, m.chat_id, m.created_at, "
            "  (SELECT x.user_id FROM messages x WHERE x.chat_id = m.chat_id AND x.id < m.id AND x.role = 'user' "
            "   ORDER BY x.id DESC LIMIT 1) AS answered, "
            "  n.role AS next_role, n.user_id AS next_user, n.text AS next_text, n.created_at AS next_at, "
            "  EXISTS (SELECT 1 FROM context_resets r WHERE r.chat_id = m.chat_id AND r.at_message_id = m.id "
            "          AND r.created_at - m.created_at <= ?) AS was_reset "
            "FROM messages m JOIN chats c ON c.id = m.chat_id "
            "LEFT JOIN messages n ON n.id = (SELECT MIN(y.id) FROM messages y WHERE y.chat_id = m.chat_id "
            "                                AND y.id > m.id AND y.status != 'failed') "
            "WHERE m.role = 'bot' AND m.status = 'ok' AND c.consent = 1 AND m.created_at <= ? "
            "  AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.message_id = m.id AND f.kind = 'implicit')",
            (window_s, now - window_s))
        if not rows:
            return 0
        inserts = []
        for r in rows:
            soon = (r["next_role"] == "user" and r["next_at"] is not None
                    and r["next_at"] - r["created_at"] <= window_s)
            continued = bool(soon and not r["was_reset"])
            who = r["next_user"] if continued else r["answered"]
            signals = {"continued": int(continued)}
            if r["was_reset"]:
                signals["reset"] = -1
            if soon and is_short_negative(r["next_text"], phrases):
                signals["short_negative"] = -1
            inserts += [(r["id"], r["chat_id"], who, s, v, now) for s, v in signals.items()]
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO feedback (message_id, chat_id, user_id, kind, signal, value, created_at) "
                "VALUES (?, ?, ?, 'implicit', ?, ?, ?)", inserts)
        return len(rows)

    async def mark_scripted(self, message_ids) -> None:
        """Replies answered to a script (a piped console): what follows them is the script's next
        line, not a reaction, so they get a neutral implicit row (signal "scripted") that keeps
        derive_implicit away from them; they stay unrated (no "continued" signal)."""
        ids = [(int(i), time.time()) for i in message_ids if i is not None]
        if not ids:
            return
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT OR IGNORE INTO feedback (message_id, chat_id, user_id, kind, signal, value, created_at) "
                "SELECT id, chat_id, NULL, 'implicit', 'scripted', 0, ? FROM messages WHERE id = ? AND role = 'bot'",
                [(at, i) for i, at in ids])

    async def scores(self, *, since: float | None = None, until: float | None = None,
                     versions=None, with_lengths: bool = False) -> list[ReplyScore]:
        """Every sent bot reply (opted-in chats, with a model version) and its feedback."""
        where, params = ["m.role = 'bot'", "m.status = 'ok'", "c.consent = 1", "m.model_version IS NOT NULL"], []
        if since is not None:
            where.append("m.created_at >= ?")
            params.append(since)
        if until is not None:
            where.append("m.created_at < ?")
            params.append(until)
        if versions:
            where.append(f"m.model_version IN ({','.join('?' * len(versions))})")
            params += list(versions)
        rows = await self.db.fetchall(
            "SELECT m.id, m.chat_id, m.model_version, m.created_at, "
            # one vote per person: the sign of each user's own reactions, summed over people
            "  COALESCE((SELECT SUM(v) FROM (SELECT CASE WHEN SUM(x.value) > 0 THEN 1 WHEN SUM(x.value) < 0 "
            "    THEN -1 ELSE 0 END AS v FROM feedback x WHERE x.message_id = m.id AND x.kind = 'explicit' "
            "    GROUP BY x.user_id) AS per_person), 0) AS ex_sum, "
            "  COUNT(CASE WHEN f.kind = 'explicit' THEN 1 END) AS ex_n, "
            "  COUNT(CASE WHEN f.kind = 'explicit' AND f.value > 0 THEN 1 END) AS ex_pos, "
            "  COUNT(CASE WHEN f.kind = 'explicit' AND f.value < 0 THEN 1 END) AS ex_neg, "
            "  COUNT(CASE WHEN f.kind = 'implicit' AND f.value < 0 THEN 1 END) AS im_neg, "
            "  MAX(CASE WHEN f.kind = 'implicit' AND f.signal = 'continued' THEN f.value END) AS cont "
            "FROM messages m JOIN chats c ON c.id = m.chat_id LEFT JOIN feedback f ON f.message_id = m.id "
            f"WHERE {' AND '.join(where)} GROUP BY m.id ORDER BY m.id", params)
        scores = [ReplyScore(r["id"], r["chat_id"], r["model_version"], r["created_at"], r["ex_sum"], r["ex_n"],
                             r["ex_pos"], r["ex_neg"], r["im_neg"] > 0, r["cont"]) for r in rows]
        if with_lengths and scores:
            lengths = await self._conversation_lengths({s.chat_id for s in scores})
            for s in scores:
                s.conversation_length = lengths.get(s.message_id, 0)
        return scores

    async def _conversation_lengths(self, chat_ids: set[int]) -> dict[int, int]:
        """message id -> messages in its conversation (cut at /reset and at hour-long silences)."""
        ids = sorted(chat_ids)
        rows = await self.db.fetchall(
            "SELECT m.id, m.chat_id, m.created_at, (SELECT COUNT(*) FROM context_resets r "
            "  WHERE r.chat_id = m.chat_id AND r.at_message_id < m.id) AS epoch FROM messages m "
            f"WHERE m.status = 'ok' AND m.chat_id IN ({','.join('?' * len(ids))}) ORDER BY m.chat_id, m.id", ids)
        out: dict[int, int] = {}
        group: list[int] = []
        prev = None
        for r in rows:
            if prev is not None and (r["chat_id"] != prev["chat_id"] or r["epoch"] != prev["epoch"]
                                     or r["created_at"] - prev["created_at"] > DIALOGUE_GAP_SECONDS):
                out.update((i, len(group)) for i in group)
                group = []
            group.append(r["id"])
            prev = r
        out.update((i, len(group)) for i in group)
        return out

    async def outcomes(self, message_ids) -> dict[int, int]:
        """{message id: outcome} for those of these ids that are evaluated bot replies."""
        ids = set(message_ids)
        if not ids:
            return {}
        return {s.message_id: s.outcome for s in await self.scores() if s.message_id in ids and s.evaluated}

    async def roles(self, message_ids) -> dict[int, str]:
        """{message id: 'user' | 'bot'} (the training filter maps ids to turns with it)."""
        ids = sorted(set(message_ids))
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = await self.db.fetchall(
                f"SELECT id, role FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            out.update((r[0], r[1]) for r in rows)
        return out

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM feedback")
        return row[0]
