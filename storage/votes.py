"""Every feedback row on the replies of some model versions, with who gave it and when Mynah
first saw them: what the canary's rater-level test (bots/learning/canary_stats.py) reads.

Only sent replies of opted-in chats count (as in storage/feedback.py's scores); rows without
a user (an implicit signal nobody can be credited with) are left out.
"""
from __future__ import annotations

from storage.db import Database


async def votes(db: Database, *, since: float, versions: list[str]) -> list[dict]:
    """[{message_id, chat_id, version, user, kind, signal, value, at, user_since}], oldest first."""
    if not versions:
        return []
    rows = await db.fetchall(
        "SELECT m.id AS message_id, m.chat_id, m.model_version AS version, f.user_id AS user, f.kind, f.signal, "
        "  f.value, f.created_at AS at, COALESCE(u.created_at, 0) AS user_since "
        "FROM messages m JOIN chats c ON c.id = m.chat_id JOIN feedback f ON f.message_id = m.id "
        "LEFT JOIN users u ON u.id = f.user_id "
        "WHERE m.role = 'bot' AND m.status = 'ok' AND c.consent = 1 AND f.user_id IS NOT NULL "
        f"  AND m.created_at >= ? AND m.model_version IN ({','.join('?' * len(versions))}) "
        "ORDER BY f.created_at, f.id", (since, *versions))
    return [dict(r) for r in rows]
