"""The numbers the dashboard shows, read from SQLite and the engine (all reads, no writes).

Message text is read only by `recent_messages`, which the Chats page calls only when
[dashboard] show_messages = true.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

from bots.metrics import engine_backend, engine_stats, stat
from engine.types import percentile

DAY_S = 24 * 3600
RATE_WINDOW_S = 300

# A bot reply's latency as users saw it: from the user message it answers (the chat's
# latest user message before it) to the reply being stored.
_REPLY_TIMES = (
    "SELECT m.created_at, m.created_at - (SELECT p.created_at FROM messages p WHERE p.chat_id = m.chat_id "
    "  AND p.id < m.id AND p.role = 'user' ORDER BY p.id DESC LIMIT 1) "
    "FROM messages m WHERE m.role = 'bot' AND m.created_at >= ?")


@dataclass
class Overview:
    """The Overview page and /api/overview."""

    platforms: dict = field(default_factory=dict)   # name -> up | down | starting
    uptime_s: float | None = None
    messages_per_min: float = 0.0
    replies_per_min: float = 0.0
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    queue_length: int | None = None
    batch_size: int | None = None
    version: str = ""
    backend: str = ""
    chats: int = 0
    users: int = 0
    messages: int = 0
    learning: bool = False
    running: dict | None = None
    workers: list = field(default_factory=list)     # several workers on PostgreSQL: each one's state

    def to_json(self) -> dict:
        return asdict(self)


async def rates(db, window_s: float = RATE_WINDOW_S) -> tuple[float, float]:
    """User messages and bot replies per minute, averaged over the last `window_s` seconds."""
    row = await db.fetchone(
        "SELECT COALESCE(SUM(CASE WHEN role = 'user' THEN 1 ELSE 0 END), 0), "
        "COALESCE(SUM(CASE WHEN role = 'bot' THEN 1 ELSE 0 END), 0) FROM messages WHERE created_at >= ?",
        (time.time() - window_s,))
    minutes = window_s / 60
    return row[0] / minutes, row[1] / minutes


async def overview(state) -> Overview:
    app = state.app
    stats = engine_stats(app.engine)
    counts = await app.store.messages.stats()
    per_min = await rates(app.db)
    p50, p95 = stat(stats, "latency_p50_s"), stat(stats, "latency_p95_s")
    if p50 is None:  # an engine that keeps no latencies: the last day's from the log
        _, latencies = await reply_times(app.db, time.time() - DAY_S)
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    uptime = stat(stats, "uptime_s")
    return Overview(
        platforms=dict(state.platforms), uptime_s=uptime if uptime is not None else time.time() - state.started_at,
        messages_per_min=per_min[0], replies_per_min=per_min[1], latency_p50_s=p50, latency_p95_s=p95,
        queue_length=stat(stats, "queue_depth", "queue_length", "queued"),
        batch_size=stat(stats, "active", "batch_size", "active_rows"),
        version=str(stat(stats, "model_version", "version", default="") or getattr(app.engine, "version", "")),
        backend=engine_backend(app.engine, stats), chats=counts["chats"], users=counts["users"],
        messages=counts["messages"], learning=app.learning is not None, running=running_run(app.learning),
        workers=await app.cluster.workers() if getattr(app, "cluster", None) is not None else [])


def running_run(learning) -> dict | None:
    """The run in flight in this process: id, trigger, stage, step / total steps, elapsed."""
    run = getattr(learning, "running", None) if learning is not None else None
    if run is None:
        return None
    started = getattr(run, "started", None)
    return {"run_id": getattr(run, "run_id", None), "trigger": getattr(run, "trigger", ""),
            "stage": str(getattr(run, "stage", "") or ""), "step": int(getattr(run, "step", 0) or 0),
            "total_steps": int(getattr(run, "total_steps", 0) or 0),
            "elapsed_s": time.time() - started if started else None}


async def reply_times(db, since: float) -> tuple[list[float], list[float]]:
    """(when, latency) of every bot reply stored since `since`, as two lists."""
    rows = await db.fetchall(_REPLY_TIMES, (since,))
    pairs = [(r[0], r[1]) for r in rows if r[1] is not None and r[1] >= 0]
    return [p[0] for p in pairs], [p[1] for p in pairs]


async def traffic(db, since: float, bucket_s: float) -> tuple[list[tuple[float, str, int]], list[tuple[float, float]]]:
    """For the chart: (bucket start, role, messages) counted in SQL, and (when, latency) of every reply."""
    rows = await db.fetchall(
        "SELECT CAST((created_at - ?) / ? AS INTEGER) AS bucket, role, COUNT(*) FROM messages "
        "WHERE created_at >= ? GROUP BY bucket, role", (since, bucket_s, since))
    when, latency = await reply_times(db, since)
    return [(since + r[0] * bucket_s, r[1], r[2]) for r in rows], list(zip(when, latency))


async def chat_summary(db) -> list[dict]:
    """Per platform and chat type: chats, opted-out chats, users who wrote there, messages."""
    rows = await db.fetchall(
        "SELECT c.platform, c.type, COUNT(*) AS chats, COALESCE(SUM(CASE WHEN c.consent = 0 THEN 1 ELSE 0 END), 0) AS opted_out, "
        "  COALESCE(SUM((SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id)), 0) AS messages "
        "FROM chats c GROUP BY c.platform, c.type ORDER BY c.platform, c.type")
    return [dict(r) for r in rows]


async def opted_out_chats(db, limit: int = 200) -> list[dict]:
    rows = await db.fetchall(
        "SELECT c.id, c.platform, c.type, c.title, c.platform_chat_id, c.thread_id, c.created_at, "
        "  (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id) AS messages "
        "FROM chats c WHERE c.consent = 0 ORDER BY c.id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


async def recent_messages(db, limit: int = 50) -> list[dict]:
    """Newest first, with their chat; only for [dashboard] show_messages = true."""
    rows = await db.fetchall(
        "SELECT m.id, m.role, m.text, m.status, m.model_version, m.created_at, c.platform, c.type, c.title, "
        "  c.platform_chat_id FROM messages m JOIN chats c ON c.id = m.chat_id ORDER BY m.id DESC LIMIT ?", (limit,))
    return [dict(r) for r in rows]


async def versions(registry, messages) -> tuple[list, str | None, dict]:
    """(versions oldest first, the active name, replies written per version)."""
    found = await asyncio.to_thread(registry.versions)
    active = await asyncio.to_thread(registry.active_name)
    replies = await messages.replies_by_version()
    return found, active, replies


async def other_process_run(learning) -> dict | None:
    """A run another process (`mynah retrain`) holds the training lock for, if any."""
    if learning is None or getattr(learning, "running", None) is not None:
        return None
    try:
        return await asyncio.to_thread(lambda: learning.registry.train_lock().holder())
    except Exception:
        return None
