"""Issue 12 in storage: the 'limited' status and reply links (a migration that rebuilds the
messages table), /forget by link and of derived titles, private file modes, capped audit
arguments, and /reset-independent export cost. Real SQLite files, and a real PostgreSQL where
the `conv` fixture runs a test on both backends."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import stat

import pytest

import storage.db as dbmod
from bots.chat.durable import WriteRetry
from bots.chat.ratelimit import RateLimiter
from bots.learning.trainer import child_environment
from storage.audit import AUDIT_ARGS_MAX
from storage.messages import StoredTurn
from storage import open_database
from storage.store import Store
from storage.db import Database


@pytest.fixture
async def conv(storage_target):
    database = await open_database(storage_target)
    yield Store.over(database)
    await database.close()


async def test_populated_v2_file_migrates_keeping_rows_links_and_the_id_counter(tmp_path, monkeypatch):
    path = tmp_path / "v2.sqlite3"
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:2])
    old = await Database.open(path)
    conv = Store.over(old)
    chat = await conv.chats.chat("telegram", 1, type="group")
    ann = await conv.chats.user("telegram", 42, name="Ann")
    insert = ("INSERT INTO messages (chat_id, user_id, role, text, platform_message_id, reply_to_platform_id, "
              "status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'ok', 0)")
    async with old.transaction() as c:          # as version 2 wrote them
        for i in range(3):
            await c.execute(insert, (chat, ann, "user", f"question {i}", str(10 + i), None))
            await c.execute(insert, (chat, None, "bot", f"answer {i}", None, str(10 + i)))
        last = (await c.execute(insert, (chat, ann, "user", "deleted later", None, None))).lastrowid
        await c.execute("DELETE FROM messages WHERE id = ?", (last,))   # the counter must not go back
    await conv.messages.reset(chat)
    await old.close()
    monkeypatch.undo()

    db = await Database.open(path)
    try:
        assert await db.user_version() == len(dbmod.MIGRATIONS)
        rows = [tuple(r) for r in await db.fetchall("SELECT id, role, text, status, reply_to_id FROM messages")]
        assert [r[2] for r in rows] == ["question 0", "answer 0", "question 1", "answer 1", "question 2", "answer 2"]
        assert [r[4] for r in rows if r[1] == "bot"] == [1, 3, 5]          # linked to what they answered
        conv = Store.over(db)
        new = await conv.messages.log_message(chat, "user", "limited one", user_id=ann, status="limited")
        assert new == last + 1
        indexes = {r[0] for r in await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"messages_chat_id", "messages_user", "messages_platform_id", "messages_reply_to"} <= indexes
        assert list(await db.fetchall("PRAGMA foreign_key_check")) == []
        assert (await db.fetchone("PRAGMA integrity_check"))[0] == "ok"
    finally:
        await db.close()


async def test_populated_v2_postgres_migrates_keeping_rows_links_and_the_id_counter(pg_url, monkeypatch):
    """PostgreSQL's own form of migration 5 (ALTER in place) keeps what SQLite's rebuild keeps."""
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:2])
    old = await open_database(pg_url)
    conv = Store.over(old)
    chat = await conv.chats.chat("telegram", 1, type="group")
    ann = await conv.chats.user("telegram", 42, name="Ann")
    insert = ("INSERT INTO messages (chat_id, user_id, role, text, platform_message_id, reply_to_platform_id, "
              "status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'ok', 0)")
    async with old.transaction() as c:
        for i in range(3):
            await c.execute(insert, (chat, ann, "user", f"question {i}", str(10 + i), None))
            await c.execute(insert, (chat, None, "bot", f"answer {i}", None, str(10 + i)))
        last = (await c.execute(insert, (chat, ann, "user", "deleted later", None, None))).lastrowid
        await c.execute("DELETE FROM messages WHERE id = ?", (last,))
    assert await old.user_version() == 2
    await old.close()
    monkeypatch.undo()

    db = await open_database(pg_url)
    try:
        assert await db.user_version() == len(dbmod.MIGRATIONS)
        rows = [tuple(r) for r in await db.fetchall("SELECT id, role, text, status, reply_to_id FROM messages "
                                                    "ORDER BY id")]
        assert [r[4] for r in rows if r[1] == "bot"] == [1, 3, 5]
        new = await Store.over(db).messages.log_message(chat, "user", "limited one", user_id=ann, status="limited")
        assert new == last + 1
    finally:
        await db.close()


async def test_forget_deletes_replies_by_link_not_the_next_bot_message(conv):
    group = await conv.chats.chat("telegram", -5, type="group")
    ann = await conv.chats.user("telegram", 1, name="Ann")
    bob = await conv.chats.user("telegram", 2, name="Bob")
    a1 = await conv.messages.log_message(group, "user", "ann asks", user_id=ann)
    b1 = await conv.messages.log_message(group, "user", "bob asks", user_id=bob)
    await conv.messages.log_message(group, "bot", "reply to bob", reply_to_id=b1)   # right after Ann's? no: Bob's
    await conv.messages.log_message(group, "bot", "reply to ann echoing ann asks", reply_to_id=a1)
    assert await conv.messages.forget_user("telegram", 1) == 1
    left = [r[0] for r in await conv.db.fetchall("SELECT text FROM messages ORDER BY id")]
    assert left == ["bob asks", "reply to bob"]


async def test_forget_clears_titles_derived_from_the_user(conv):
    dm = await conv.chats.chat("discord", 77, type="private", title="DM with ann#1234")
    ann = await conv.chats.user("discord", 1, name="ann")
    await conv.messages.log_message(dm, "user", "hi", user_id=ann)
    group = await conv.chats.chat("discord", 88, type="group", title="Server #general")
    await conv.messages.log_message(group, "user", "hello all", user_id=ann)
    await conv.messages.forget_user("discord", 1)
    titles = dict(tuple(r) for r in await conv.db.fetchall("SELECT platform_chat_id, title FROM chats"))
    assert titles == {"77": None, "88": "Server #general"}


async def test_context_leaves_out_pending_failed_and_limited(conv):
    chat = await conv.chats.chat("telegram", 3)
    await conv.messages.log_message(chat, "user", "one")
    await conv.messages.log_message(chat, "bot", "never confirmed", status="pending")
    await conv.messages.log_message(chat, "user", "flood", status="limited")
    await conv.messages.log_message(chat, "bot", "lost", status="failed")
    await conv.messages.log_message(chat, "user", "two")
    assert await conv.messages.context(chat, 10) == [StoredTurn("user", "one"), StoredTurn("user", "two")]
    assert await conv.messages.count_user_messages() == 2


async def test_database_wal_and_folder_are_private(tmp_path):
    old = os.umask(0o022)
    try:
        db = await Database.open(tmp_path / "new" / "mynah.sqlite3")
        conv = Store.over(db)
        await conv.messages.log_message(await conv.chats.chat("telegram", 1), "user", "secret")
        try:
            for name in ("mynah.sqlite3", "mynah.sqlite3-wal", "mynah.sqlite3-shm"):
                assert stat.S_IMODE((tmp_path / "new" / name).stat().st_mode) == 0o600, name
            assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
        finally:
            await db.close()
    finally:
        os.umask(old)


def test_registry_folder_is_private(tmp_path):
    from engine.registry import Registry

    old = os.umask(0o022)
    try:
        registry = Registry(tmp_path / "models")
        registry.register_configured("starter")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o700


def test_trainer_child_gets_no_tokens():
    env = child_environment({"PATH": "/bin", "TELEGRAM_BOT_TOKEN": "1:a", "DISCORD_BOT_TOKEN": "x",
                             "MYNAH_DASHBOARD_TOKEN": "y", "OPENAI_API_KEY": "z", "HOME": "/h"})
    assert env == {"PATH": "/bin", "HOME": "/h"}


async def test_audit_keeps_at_most_200_characters_of_arguments(conv):
    await conv.audit.record("telegram", 5, "status", "x" * 3000, False)
    (args,), = [tuple(r) for r in await conv.db.fetchall("SELECT args FROM admin_audit")]
    assert len(args) == AUDIT_ARGS_MAX


async def _export_steps(conv) -> int:
    """SQLite VM steps (a deterministic cost measure) spent by one training read."""
    if conv.db.backend != "sqlite":
        pytest.skip("counts SQLite VM steps")
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    raw = conv.db.conn._conn      # the sqlite3 connection behind aiosqlite
    await conv.db.conn._execute(raw.set_progress_handler, count, 100)
    try:
        dialogues = await conv.trust.training_rows()
    finally:
        await conv.db.conn._execute(raw.set_progress_handler, None, 100)
    assert dialogues
    return steps


async def test_export_cost_does_not_grow_with_the_number_of_resets(conv):
    """Someone spams /reset: the export's work must follow the messages, not messages x resets."""
    async def chat_with(resets: int, platform_chat_id: int) -> int:
        chat = await conv.chats.chat("telegram", platform_chat_id)
        for i in range(100):
            await conv.messages.log_message(chat, "user", f"q{i}")
            await conv.messages.log_message(chat, "bot", f"a{i}")
        for _ in range(resets):
            await conv.messages.reset(chat)
        for i in range(100):
            await conv.messages.log_message(chat, "user", f"q{i}")
            await conv.messages.log_message(chat, "bot", f"a{i}")
        return chat

    await chat_with(10, 1)
    quiet = await _export_steps(conv)
    await chat_with(2000, 2)
    spammed = await _export_steps(conv)
    # twice the messages and 2000 more resets: about twice the work (the old per-message
    # COUNT over context_resets did ~200 x 2000 index steps more)
    assert spammed < quiet * 4, (quiet, spammed)


def test_rate_limiter_forgets_idle_users_and_notices_once_per_window():
    now = [0.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0])
    for user in range(1000):
        limiter.check(("t", user))
    assert len(limiter) == 1000
    verdicts = [limiter.check(("t", "flood")) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True, True, False, False, False, False]
    assert [v.notify for v in verdicts] == [False, False, True, False, False, False]
    now[0] = 11.0
    limiter.check(("t", "new"))
    assert len(limiter) == 1                       # everyone idle for a window is gone
    now[0] = 11.5
    assert limiter.check(("t", "new")).allowed and not limiter.check(("t", "new")).allowed


async def test_write_retry_waits_out_a_lock_and_gives_up_only_when_abandoned(tmp_path):
    db = await Database.open(tmp_path / "w.sqlite3", busy_timeout_ms=50)
    db.retries, db.retry_delay = 0, 0.01
    conv = Store.over(db)
    chat = await conv.chats.chat("telegram", 1)
    locker = sqlite3.connect(db.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    retry = WriteRetry(0.05, 0.2)
    task = asyncio.create_task(retry.run("test", lambda: conv.messages.log_message(chat, "user", "kept")))
    await asyncio.sleep(1.0)
    assert not task.done()
    locker.execute("ROLLBACK")
    assert await asyncio.wait_for(task, 5) > 0
    locker.execute("BEGIN EXCLUSIVE")
    task = asyncio.create_task(retry.run("test", lambda: conv.messages.log_message(chat, "user", "dropped")))
    await asyncio.sleep(0.3)
    retry.abandon()
    with pytest.raises(dbmod.StorageError, match="stopping"):
        await asyncio.wait_for(task, 5)
    locker.execute("ROLLBACK")
    locker.close()
    await db.close()


async def test_write_retry_rides_out_a_full_disk():
    calls = []

    async def write():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database or disk is full")
        return "stored"

    assert await WriteRetry(0.01, 0.02).run("test", write) == "stored" and len(calls) == 3

    async def broken():
        raise sqlite3.IntegrityError("NOT NULL constraint failed")   # a bug, not storage trouble

    with pytest.raises(sqlite3.IntegrityError):
        await WriteRetry(0.01, 0.02).run("test", broken)
