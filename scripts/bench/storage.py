"""The storage half of `mynah bench`: context fetches and logging with many messages stored.

Setup bulk-loads N messages spread over many chats with executemany in one transaction
(fast; not what is timed), then times what the bot does per message through the real
code: `Messages.context()` (p50/p99 over random chats) and `Messages.log_message()`
(messages per second, each its own committed transaction), and prints SQLite's query plan
for the context query so the index use can be checked.
"""
from __future__ import annotations

import os
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from engine.types import percentile

# The context query as storage/conversations.py (now storage/messages.py) wrote it when this was written; the bench
# prints the plan of the SQL that Messages.context() really runs (captured with a
# trace callback) and falls back to this text only if nothing was captured.
CONTEXT_SQL = (
    "SELECT role, text FROM ("
    "  SELECT m.id, m.role, m.text FROM messages m JOIN chats c ON c.id = m.chat_id"
    "  WHERE m.chat_id = ? AND m.id > c.context_start_id AND m.status != 'failed'"
    "  ORDER BY m.id DESC LIMIT ?"
    ") ORDER BY id"
)

WORDS = ("hello there how are you doing today i like to read books about the sea and my dog is small "
         "what is your name where do you live good night see you later thank you very much").split()


def _bulk_load(path: str, messages: int, chats: int, seed: int = 0) -> float:
    """Chats, users and `messages` rows in one transaction (executemany); returns seconds."""
    rng = random.Random(seed)
    t = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    now = time.time()
    db.executemany("INSERT INTO chats (id, platform, platform_chat_id, type, created_at) VALUES (?, 'telegram', ?, 'private', ?)",
                   [(i, str(1000 + i), now) for i in range(1, chats + 1)])
    db.executemany("INSERT INTO users (id, platform, platform_user_id, name, created_at) VALUES (?, 'telegram', ?, ?, ?)",
                   [(i, str(1000 + i), f"user{i}", now) for i in range(1, chats + 1)])

    def rows():
        for i in range(messages):
            chat = rng.randint(1, chats)
            user_turn = i % 2 == 0
            text = " ".join(rng.choices(WORDS, k=rng.randint(3, 14)))
            yield (chat, chat if user_turn else None, "user" if user_turn else "bot", text,
                   str(i) if user_turn else None, None if user_turn else "v0001", now - (messages - i))

    db.executemany("INSERT INTO messages (chat_id, user_id, role, text, platform_message_id, model_version, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", rows())
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()
    return time.perf_counter() - t


async def captured_context_sql(conv, chat_id: int, max_turns: int) -> str | None:
    """The SQL (values filled in) that Messages.context() runs, via sqlite's trace callback."""
    seen: list[str] = []
    await conv.db.conn.set_trace_callback(seen.append)
    try:
        await conv.context(chat_id, max_turns)
    finally:
        await conv.db.conn.set_trace_callback(None)
    selects = [q for q in seen if q.lstrip().upper().startswith("SELECT") and "messages" in q]
    return selects[-1] if selects else None


def query_plan(path: str, sql: str = CONTEXT_SQL, params=(1, 6)) -> list[str]:
    """EXPLAIN QUERY PLAN lines for `sql`."""
    db = sqlite3.connect(path)
    try:
        return [row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params)]
    finally:
        db.close()


def _raw_context_latencies(path: str, chats: int, queries: int, max_turns: int) -> list[float]:
    """The same query on a plain sqlite3 connection: the database's share of context()'s time."""
    rng = random.Random(2)
    db = sqlite3.connect(path)
    try:
        out = []
        for _ in range(queries):
            chat = rng.randint(1, chats)
            t = time.perf_counter()
            db.execute(CONTEXT_SQL, (chat, max_turns)).fetchall()
            out.append(time.perf_counter() - t)
        return out
    finally:
        db.close()


async def bench_storage(messages: int, *, chats: int | None = None, queries: int = 2000, writes: int = 2000,
                        max_turns: int = 6, folder: str | None = None) -> dict:
    """Bulk-load `messages`, then time context() and log_message() through storage/."""
    from storage.messages import Messages
    from storage.db import Database

    chats = chats or max(10, min(20_000, messages // 50))
    with tempfile.TemporaryDirectory(prefix="mynah-bench-db-", dir=folder) as tmp:
        path = str(Path(tmp) / "bench.sqlite3")
        db = await Database.open(path)  # schema + pragmas exactly as the bot has them
        await db.close()
        load_s = _bulk_load(path, messages, chats)
        db = await Database.open(path)
        conv = Messages(db)
        sql = await captured_context_sql(conv, 1, max_turns)
        plan = query_plan(path, sql, ()) if sql else query_plan(path)
        rng = random.Random(1)
        for _ in range(50):  # warm the page cache a little, as a running bot has it
            await conv.context(rng.randint(1, chats), max_turns)
        latencies = []
        for _ in range(queries):
            chat = rng.randint(1, chats)
            t = time.perf_counter()
            turns = await conv.context(chat, max_turns)
            latencies.append(time.perf_counter() - t)
        assert turns is not None
        raw = _raw_context_latencies(path, chats, queries, max_turns)
        t = time.perf_counter()
        for i in range(writes):
            await conv.log_message(rng.randint(1, chats), "user", "a new message " + str(i), user_id=1,
                                   platform_message_id=f"new{i}")
        write_s = time.perf_counter() - t
        await db.close()
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6
    return {"messages": messages, "chats": chats, "load_s": load_s, "plan": plan, "sql": sql or CONTEXT_SQL,
            "context_p50_ms": 1000 * percentile(latencies, 0.5), "context_p99_ms": 1000 * percentile(latencies, 0.99),
            "context_queries": queries, "sql_p50_ms": 1000 * percentile(raw, 0.5), "sql_p99_ms": 1000 * percentile(raw, 0.99),
            "log_per_s": writes / write_s, "log_ms": 1000 * write_s / writes,
            "writes": writes, "db_mb": size_mb, "loadavg": list(os.getloadavg())}


def format_storage(result: dict, markdown: bool = False) -> str:
    r = result
    ok = r["context_p99_ms"] <= 2.0
    uses_index = any("USING INDEX messages_chat_id" in line or "USING COVERING INDEX messages_chat_id" in line
                     for line in r["plan"])
    lines = [f"storage: {r['messages']:,} messages in {r['chats']:,} chats (bulk load {r['load_s']:.1f} s, "
             f"file {r['db_mb']:.0f} MB)"]
    rows = [["context() fetch, p50", f"{r['context_p50_ms']:.3f} ms"],
            ["context() fetch, p99", f"{r['context_p99_ms']:.3f} ms (target ≤ 2 ms: {'met' if ok else 'MISSED'})"],
            ["same SQL on plain sqlite3, p50 / p99", f"{r['sql_p50_ms']:.3f} / {r['sql_p99_ms']:.3f} ms "
             "(the rest is aiosqlite's thread hop)"],
            ["log_message() throughput", f"{r['log_per_s']:.0f} messages/s ({r['log_ms']:.2f} ms each, one commit each)"]]
    if markdown:
        lines += ["", "| storage | measured |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    else:
        lines += [f"  {a:<28} {b}" for a, b in rows]
    lines.append("")
    lines.append("EXPLAIN QUERY PLAN of the context query" + ("" if uses_index else " (does NOT use messages_chat_id!)") + ":")
    lines += [("    " if markdown else "  ") + line for line in r["plan"]]
    return "\n".join(lines)
