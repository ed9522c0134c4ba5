"""Prometheus metrics: a few live counters fed per reply, the rest read at scrape time.

Live (this module's REGISTRY, fed by ONE call per generated reply, `record_reply`):
    mynah_replies_total{platform,status}            replies generated (status ok | fallback)
    mynah_reply_latency_seconds{platform}           histogram: queueing + generation time
    mynah_tokens_generated_total{platform}          tokens the model wrote for those replies

At scrape time (`snapshot(app)` then `SnapshotCollector`, no hooks anywhere else):
    mynah_stored_replies{platform,status}           bot replies stored by delivery status (sent |
                                                    failed | pending): what reached users; a
                                                    StoredReplies tally read incrementally
    mynah_engine_queue_length / mynah_engine_batch_size / mynah_engine_max_batch_size
    mynah_training_runs_total{decision}             promoted | rejected | skipped | failed | interrupted | running
    mynah_active_model_info{version,backend}        1 for the version being served
    mynah_platform_up{platform}                     1 up, 0 configured but not (yet) up
    mynah_uptime_seconds

The scrape-time part is two steps because the database is async and a Collector is not:
`await snapshot(app)` reads SQLite and the engine, then a throwaway registry renders it.
A scrape must not scan the messages table (20 scrapes at once at 400k messages held a user's
message 3.2 s): StoredReplies reads only rows newer than its last scrape, by primary key.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

REPLIES = Counter("mynah_replies", "Replies generated, by platform and outcome (ok, fallback)",
                  ["platform", "status"], registry=REGISTRY)
LATENCY = Histogram("mynah_reply_latency_seconds", "Time from the engine taking a request to its reply",
                    ["platform"], registry=REGISTRY,
                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, float("inf")))
TOKENS = Counter("mynah_tokens_generated", "Tokens the model generated for replies", ["platform"], registry=REGISTRY)

RUN_DECISIONS = ("promoted", "rejected", "skipped", "failed", "interrupted", "running")


def record_reply(platform: str, status: str = "ok", latency_s: float | None = None, tokens: int = 0) -> None:
    """Count one reply. The chat service calls this once per reply it generated (or could not)."""
    try:
        REPLIES.labels(platform=platform, status=status).inc()
        if latency_s is not None:
            LATENCY.labels(platform=platform).observe(max(0.0, float(latency_s)))
        if tokens:
            TOKENS.labels(platform=platform).inc(int(tokens))
    except Exception:  # metrics must never break a reply
        log.exception("could not record reply metrics")


# ---------------------------------------------------------------------------- engine stats

def engine_stats(engine) -> dict:
    """engine.stats() as a plain dict, whether it returns a dict or a (typed) dataclass."""
    if engine is None:
        return {}
    try:
        raw = engine.stats()
    except Exception:
        log.exception("engine.stats() failed")
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    import dataclasses

    if dataclasses.is_dataclass(raw):
        return {f.name: getattr(raw, f.name) for f in dataclasses.fields(raw)}
    return dict(vars(raw)) if hasattr(raw, "__dict__") else {}


def stat(stats: dict, *names: str, default=None):
    """The first of `names` that the stats carry (the field names moved once already)."""
    for name in names:
        if stats.get(name) is not None:
            return stats[name]
    return default


def engine_backend(engine, stats: dict | None = None) -> str:
    """A short word for what serves replies: "local" (this process), "local+mmi", or what a remote engine says."""
    stats = engine_stats(engine) if stats is None else stats
    backend = stat(stats, "backend", default=None) or getattr(engine, "backend", None)
    if not isinstance(backend, str) or not backend or backend == "local":
        backend = "local"
        device = getattr(getattr(engine, "model", None), "device", None)
        if device is not None:
            backend = f"local ({device})"
    if stat(stats, "mmi", default=None):
        backend += " + MMI"
    return backend


# ---------------------------------------------------------------------------- scrape time

@dataclass
class Snapshot:
    """What the scrape-time metrics say, read once per scrape."""

    stored_replies: dict = field(default_factory=dict)     # (platform, status) -> count
    runs: dict = field(default_factory=dict)               # decision -> count
    queue_length: int | None = None
    batch_size: int | None = None
    max_batch_size: int | None = None
    version: str = ""
    backend: str = ""
    platforms: dict = field(default_factory=dict)          # name -> "up" | "down" | "starting"
    uptime_s: float | None = None


def run_decision(decision: str | None, status: str | None) -> str:
    """training_runs.decision reads "promoted v0002: …", "rejected: …" or a bare word."""
    word = (decision or "").split(":", 1)[0].split(" ", 1)[0].strip().lower()
    if word in RUN_DECISIONS:
        return word
    return "running" if status == "running" else (status or "unknown")


class StoredReplies:
    """Bot replies by (platform, status), kept up to date from the rows added since the last read.

    Each read is a primary-key range (`id > watermark`, at most CHUNK rows per query, so even
    the first read of a large table lets writes in between) plus the few replies that were
    pending last time, looked up by id. Counts are per process: a reply deleted later
    (/forget) is still counted until a restart."""

    CHUNK = 10_000
    NAMES = {"ok": "sent", "failed": "failed", "pending": "pending"}

    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}
        self.watermark = 0
        self.pending: dict[int, str] = {}        # id -> platform of replies still pending
        self._lock = asyncio.Lock()               # concurrent scrapes share one read

    async def read(self, db) -> dict[tuple[str, str], int]:
        async with self._lock:
            await self._recheck_pending(db)
            top = (await db.fetchone("SELECT MAX(id) FROM messages"))[0] or 0   # the primary key's last entry
            while self.watermark < top:
                upper = min(self.watermark + self.CHUNK, top)
                for message_id, platform, status in await db.fetchall(
                        "SELECT m.id, c.platform, m.status FROM messages m CROSS JOIN chats c ON c.id = m.chat_id "
                        "WHERE m.id > ? AND m.id <= ? AND m.role = 'bot'", (self.watermark, upper)):
                    self._count(message_id, platform, status)
                self.watermark = upper
            counts = dict(self.counts)
            for platform in self.pending.values():
                counts[(platform, "pending")] = counts.get((platform, "pending"), 0) + 1
            return counts

    def _count(self, message_id: int, platform: str, status: str) -> None:
        if status == "pending":
            self.pending[message_id] = platform
        else:
            key = (platform, self.NAMES.get(status, status))
            self.counts[key] = self.counts.get(key, 0) + 1

    async def _recheck_pending(self, db) -> None:
        ids = list(self.pending)
        for start in range(0, len(ids), 500):
            batch = ids[start:start + 500]
            marks = ",".join("?" * len(batch))
            found = {r[0]: r[1] for r in await db.fetchall(
                f"SELECT id, status FROM messages WHERE id IN ({marks})", batch)}
            for message_id in batch:
                platform = self.pending.pop(message_id)
                if message_id in found:      # gone: forgotten while pending
                    self._count(message_id, platform, found[message_id])


async def snapshot(app, platforms: dict | None = None, started_at: float | None = None,
                   stored: StoredReplies | None = None) -> Snapshot:
    """What a scrape shows; `stored` is the caller's long-lived tally (a fresh one reads every row)."""
    snap = Snapshot(platforms=dict(platforms or {}))
    snap.stored_replies = await (stored or StoredReplies()).read(app.db)
    for row in await app.db.fetchall("SELECT decision, status FROM training_runs"):
        key = run_decision(row[0], row[1])
        snap.runs[key] = snap.runs.get(key, 0) + 1
    stats = engine_stats(app.engine)
    snap.queue_length = stat(stats, "queue_depth", "queue_length", "queued")
    snap.batch_size = stat(stats, "active", "batch_size", "active_rows")
    snap.max_batch_size = getattr(app.engine, "max_batch_size", None)
    snap.version = str(stat(stats, "model_version", "version", default="") or getattr(app.engine, "version", ""))
    snap.backend = engine_backend(app.engine, stats)
    uptime = stat(stats, "uptime_s")
    snap.uptime_s = uptime if uptime is not None else (time.time() - started_at if started_at else None)
    return snap


class SnapshotCollector:
    """A prometheus Collector over one Snapshot (registered in a throwaway registry per scrape)."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def collect(self):
        s = self.snap
        stored = GaugeMetricFamily("mynah_stored_replies", "Bot replies in the database by delivery status",
                                   labels=["platform", "status"])
        for (platform, status), n in sorted(s.stored_replies.items()):
            stored.add_metric([platform, status], n)
        yield stored
        runs = CounterMetricFamily("mynah_training_runs", "Training runs by decision", labels=["decision"])
        for decision, n in sorted(s.runs.items()):
            runs.add_metric([decision], n)
        yield runs
        for name, doc, value in (
                ("mynah_engine_queue_length", "Requests waiting for a slot in the batch", s.queue_length),
                ("mynah_engine_batch_size", "Requests being decoded now", s.batch_size),
                ("mynah_engine_max_batch_size", "Most requests decoded together", s.max_batch_size),
                ("mynah_uptime_seconds", "Seconds since the engine started", s.uptime_s)):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        if s.version:
            info = InfoMetricFamily("mynah_active_model", "The model version being served")
            info.add_metric([], {"version": s.version, "backend": s.backend})
            yield info
        up = GaugeMetricFamily("mynah_platform_up", "1 when the platform is connected", labels=["platform"])
        for platform, state in sorted(s.platforms.items()):
            up.add_metric([platform], 1.0 if state == "up" else 0.0)
        yield up


def render(snap: Snapshot) -> bytes:
    """The whole exposition: the live metrics, then the scrape-time ones."""
    scrape = CollectorRegistry(auto_describe=False)
    scrape.register(SnapshotCollector(snap))
    return generate_latest(REGISTRY) + generate_latest(scrape)
