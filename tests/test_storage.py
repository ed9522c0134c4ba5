"""Storage against real SQLite files and a real PostgreSQL (the `db` fixture runs each test on
both): migrations, context, reset/forget, concurrency, export."""
from __future__ import annotations

import asyncio
import os
import sqlite3
import types
from pathlib import Path

import pytest

import storage.db as dbmod
from bots.learning.export import allowed_dialogues
from storage import open_database
from storage.messages import StoredTurn
from storage.store import Store
from storage.db import MIGRATIONS, Database, StorageError

ALL_TABLES = {"chats", "users", "messages", "context_resets", "model_versions", "training_runs",
              "admin_audit", "forgotten"}


@pytest.fixture
async def db(storage_target):
    database = await open_database(storage_target)
    yield database
    await database.close()


@pytest.fixture
def conv(db):
    return Store.over(db)


def tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def file_bytes(path: Path) -> bytes:
    """The database and its WAL, as they lie on disk."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


async def exchange(conv, chat_id, user_id, *pairs):
    """Log user/bot pairs; return the message ids."""
    ids = []
    for user_text, bot_text in pairs:
        ids.append(await conv.messages.log_message(chat_id, "user", user_text, user_id=user_id))
        ids.append(await conv.messages.log_message(chat_id, "bot", bot_text, model_version="v1", reply_to_id=ids[-1]))
    return ids


# --- opening and migrations ----------------------------------------------------------------

async def test_fresh_file_gets_every_migration_and_pragmas(tmp_path):
    path = tmp_path / "deep" / "folder" / "m.sqlite3"
    database = await Database.open(path)
    try:
        assert await database.user_version() == len(MIGRATIONS) >= 2
        assert (await database.fetchone("PRAGMA journal_mode"))[0] == "wal"
        assert (await database.fetchone("PRAGMA foreign_keys"))[0] == 1
        assert (await database.fetchone("PRAGMA synchronous"))[0] == 1  # NORMAL
        assert (await database.fetchone("PRAGMA busy_timeout"))[0] == 5000
    finally:
        await database.close()
    assert ALL_TABLES <= tables(path)
    with sqlite3.connect(path) as conn:  # WAL is persistent: a fresh connection sees it too
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_migrates_from_previous_version_keeping_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO chats (platform, platform_chat_id, created_at) VALUES ('tg', '7', 0)")
        conn.execute("INSERT INTO users (platform, platform_user_id, name, created_at) VALUES ('tg', '9', 'ann', 0)")
        conn.execute("INSERT INTO messages (chat_id, user_id, role, text, created_at) VALUES (1, 1, 'user', 'old hi', 0)")
        conn.execute("INSERT INTO messages (chat_id, role, text, created_at) VALUES (1, 'bot', 'old hello', 0)")
    assert "admin_audit" not in tables(path)

    database = await Database.open(path)
    try:
        conv = Store.over(database)
        assert await database.user_version() == len(MIGRATIONS)
        assert await conv.chats.chat("tg", 7) == 1
        assert await conv.messages.context(1, 10) == [StoredTurn("user", "old hi"), StoredTurn("bot", "old hello")]
        await conv.audit.record("tg", 9, "/status", "", True)  # a table from migration 2 works
        assert await conv.messages.forget_user("tg", 9) == 1
    finally:
        await database.close()
    assert ALL_TABLES <= tables(path)


async def test_failed_migration_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "m.sqlite3"
    monkeypatch.setattr(dbmod, "MIGRATIONS", [MIGRATIONS[0], "CREATE TABLE half (x INTEGER); THIS IS NOT SQL;"])
    with pytest.raises(StorageError, match="migration 2"):
        await Database.open(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "chats" in tables(path) and "half" not in tables(path)


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(StorageError, match="newer"):
        await Database.open(path)


async def test_corrupt_file_names_the_path(tmp_path):
    path = tmp_path / "corrupt.sqlite3"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StorageError) as info:
        await Database.open(path)
    assert str(path) in str(info.value)


async def test_memory_database_works():
    database = await Database.open(":memory:")
    try:
        conv = Store.over(database)
        chat = await conv.chats.chat("console", "local", type="console")
        await conv.messages.log_message(chat, "user", "hi")
        assert await conv.messages.context(chat, 5) == [StoredTurn("user", "hi")]
    finally:
        await database.close()


# --- chats, users, messages ------------------------------------------------------------------

async def test_chat_and_user_upsert(conv):
    a = await conv.chats.chat("tg", 100, type="group", title="Old")
    assert await conv.chats.chat("tg", "100", title="New") == a
    assert tuple(await conv.db.fetchone("SELECT title, type FROM chats WHERE id = ?", (a,))) == ("New", "group")
    assert await conv.chats.chat("tg", 100) == a  # no title given: kept
    assert (await conv.db.fetchone("SELECT title FROM chats WHERE id = ?", (a,)))[0] == "New"
    assert await conv.chats.chat("tg", 100, thread_id=5) != a
    assert await conv.chats.chat("discord", 100) != a
    u = await conv.chats.user("tg", 1, name="ann")
    assert await conv.chats.user("tg", "1", name="anna") == u
    assert (await conv.db.fetchone("SELECT name FROM users WHERE id = ?", (u,)))[0] == "anna"
    assert await conv.chats.user("discord", 1) != u
    assert await conv.messages.stats() == {"chats": 3, "users": 2, "messages": 0}


async def test_log_message_is_durable_and_validated(db, conv, storage_target):
    chat = await conv.chats.chat("tg", 1)
    mid = await conv.messages.log_message(chat, "user", "kept", platform_message_id=55, reply_to=54)
    other = await open_database(storage_target)   # another connection sees it: committed
    try:
        assert tuple(await other.fetchone("SELECT text, platform_message_id, reply_to_platform_id FROM messages "
                                          "WHERE id = ?", (mid,))) == ("kept", "55", "54")
    finally:
        await other.close()
    with pytest.raises(ValueError):
        await conv.messages.log_message(chat, "system", "x")
    with pytest.raises(ValueError):
        await conv.messages.log_message(chat, "bot", "x", status="sent")
    assert await conv.messages.max_message_id() == mid


async def test_context_per_chat_and_thread_with_limit_and_order(conv):
    a = await conv.chats.chat("tg", 1)
    b = await conv.chats.chat("tg", 2)
    topic = await conv.chats.chat("tg", 2, thread_id="77")
    for i in range(6):
        await conv.messages.log_message(a, "user" if i % 2 == 0 else "bot", f"a{i}")
        await conv.messages.log_message(b, "user", f"b{i}")
        await conv.messages.log_message(topic, "user", f"t{i}")
    assert [t.text for t in await conv.messages.context(a, 4)] == ["a2", "a3", "a4", "a5"]
    assert [t.role for t in await conv.messages.context(a, 4)] == ["user", "bot", "user", "bot"]
    assert [t.text for t in await conv.messages.context(b, 2)] == ["b4", "b5"]
    assert [t.text for t in await conv.messages.context(topic, 100)] == [f"t{i}" for i in range(6)]
    assert await conv.messages.context(a, 0) == []


async def test_failed_replies_leave_context_and_replies_are_recognised(conv):
    chat = await conv.chats.chat("tg", 1)
    other = await conv.chats.chat("tg", 2)
    await conv.messages.log_message(chat, "user", "hi", platform_message_id=10)
    bad = await conv.messages.log_message(chat, "bot", "lost", status="pending")
    good = await conv.messages.log_message(chat, "bot", "hello", status="pending")
    await conv.messages.set_status(bad, "failed")
    await conv.messages.set_status(good, "ok", platform_message_id=11)
    assert await conv.messages.context(chat, 10) == [StoredTurn("user", "hi"), StoredTurn("bot", "hello")]
    assert await conv.messages.is_bot_message(chat, 11)
    assert await conv.messages.is_bot_message(chat, "11")
    assert not await conv.messages.is_bot_message(chat, 10)   # the user's own message
    assert not await conv.messages.is_bot_message(other, 11)  # same id, other chat


async def test_a_redelivered_message_needs_an_answer_only_until_it_is_answered_or_the_chat_moves_on(conv):
    chat = await conv.chats.chat("tg", 1)
    elsewhere = await conv.chats.chat("tg", 2)
    first = await conv.messages.log_message(chat, "user", "one", platform_message_id=10)
    assert await conv.messages.seen_message(chat, 10) == (first, False)      # stored, never answered
    lost = await conv.messages.log_message(chat, "bot", "lost", reply_to_id=first, status="pending")
    assert await conv.messages.seen_message(chat, 10) == (first, True)       # pending: recovery sends it
    await conv.messages.set_status(lost, "failed")
    assert await conv.messages.seen_message(chat, 10) == (first, False)      # failed: answer it again
    await conv.messages.log_message(elsewhere, "user", "other chat", platform_message_id=11)
    await conv.messages.log_message(chat, "user", "limited", platform_message_id=12, status="limited")
    assert await conv.messages.seen_message(chat, 10) == (first, False)      # neither moves this chat on
    await conv.messages.log_message(chat, "user", "two", platform_message_id=13)
    assert await conv.messages.seen_message(chat, 10) == (first, True)       # the chat moved on: no late answer
    assert await conv.messages.seen_message(chat, 13) is not None and not (await conv.messages.seen_message(chat, 13))[1]


async def test_consent(conv):
    chat = await conv.chats.chat("tg", 1)
    assert await conv.chats.consent(chat) is True
    await conv.chats.set_consent(chat, False)
    assert await conv.chats.consent(chat) is False
    await conv.chats.set_consent(chat, True)
    assert await conv.chats.consent(chat) is True


async def test_audit_newest_first(conv):
    await conv.audit.record("tg", 1, "/retrain", "", False)
    await conv.audit.record("tg", 2, "/rollback", "v0001", True)
    rows = await conv.audit.recent(limit=1)
    assert len(rows) == 1
    assert (rows[0]["platform_user_id"], rows[0]["command"], rows[0]["args"], rows[0]["allowed"]) == \
        ("2", "/rollback", "v0001", True)
    assert [r["allowed"] for r in await conv.audit.recent()] == [True, False]


# --- reset and forget ---------------------------------------------------------------------

async def test_reset_keeps_rows_but_empties_context(conv):
    chat = await conv.chats.chat("tg", 1)
    other = await conv.chats.chat("tg", 2)
    await exchange(conv, chat, None, ("hi", "hello"))
    await conv.messages.log_message(other, "user", "elsewhere")
    await conv.messages.reset(chat)
    assert await conv.messages.context(chat, 10) == []
    assert await conv.messages.context(other, 10) == [StoredTurn("user", "elsewhere")]
    assert (await conv.messages.stats())["messages"] == 3
    await conv.messages.log_message(chat, "user", "again")
    assert await conv.messages.context(chat, 10) == [StoredTurn("user", "again")]
    resets = await conv.db.fetchall("SELECT chat_id FROM context_resets")
    assert [r[0] for r in resets] == [chat]


async def test_forget_really_deletes_user_and_their_replies(db, conv, storage_target):
    sqlite = db.backend == "sqlite"
    path = Path(db.path)
    a = await conv.chats.chat("tg", 1)
    b = await conv.chats.chat("tg", 2, type="group")
    elsewhere = await conv.chats.chat("discord", 1)
    ann = await conv.chats.user("tg", 42, name="Ann")
    bob = await conv.chats.user("tg", 43, name="Bob")
    ann_discord = await conv.chats.user("discord", 42)
    await exchange(conv, a, ann, ("ann-secret-one", "reply-to-ann-one"))
    await conv.messages.log_message(b, "user", "bob-says-hi", user_id=bob)
    await exchange(conv, b, ann, ("ann-secret-two", "reply-to-ann-two"))
    await conv.messages.log_message(b, "bot", "bot-unprompted")    # not directly after Ann: kept
    await exchange(conv, b, bob, ("bob-question", "reply-to-bob"))
    await conv.messages.log_message(elsewhere, "user", "ann-on-discord", user_id=ann_discord)
    await db.compact_wal()
    assert not sqlite or b"ann-secret-one" in file_bytes(path)

    assert await conv.messages.forget_user("tg", "42") == 2
    assert (await conv.messages.stats())["messages"] == 9 - 4
    assert await conv.messages.context(a, 10) == []
    assert [t.text for t in await conv.messages.context(b, 10)] == \
        ["bob-says-hi", "bot-unprompted", "bob-question", "reply-to-bob"]
    assert [t.text for t in await conv.messages.context(elsewhere, 10)] == ["ann-on-discord"]  # other platform
    assert len(await conv.messages.forgotten_message_ids()) == 4
    assert (await db.fetchone("SELECT name FROM users WHERE id = ?", (ann,)))[0] is None

    fresh = await open_database(storage_target)
    try:
        assert (await fresh.fetchone("SELECT COUNT(*) FROM messages WHERE text LIKE '%ann-secret%' "
                                     "OR text LIKE 'reply-to-ann%'"))[0] == 0
        assert [tuple(r) for r in await fresh.fetchall("SELECT platform_user_id FROM forgotten")] == [("42",)]
    finally:
        await fresh.close()
    if sqlite:   # the text is gone from the file itself (PostgreSQL: VACUUM's job, not ours)
        raw = file_bytes(path)
        assert b"ann-secret" not in raw and b"reply-to-ann" not in raw
    assert await conv.messages.forget_user("tg", 42) == 0  # forgetting twice is harmless


# --- concurrency and locking ----------------------------------------------------------------

async def test_fifty_concurrent_writers_lose_nothing(conv):
    async def writer(n):
        chat = await conv.chats.chat("tg", n)
        for i in range(20):
            await conv.messages.log_message(chat, "user" if i % 2 == 0 else "bot", f"{n}:{i}")
        return chat

    chats = await asyncio.gather(*(writer(n) for n in range(50)))
    assert len(set(chats)) == 50
    assert (await conv.messages.stats())["messages"] == 1000
    for n, chat in enumerate(chats):
        assert [t.text for t in await conv.messages.context(chat, 100)] == [f"{n}:{i}" for i in range(20)]


async def test_a_failing_transaction_does_not_take_others_down(db, conv):
    chat = await conv.chats.chat("tg", 1)

    async def fails():
        async with db.transaction() as conn:
            await conn.execute("INSERT INTO messages (chat_id, role, text, created_at) VALUES (?, 'user', 'x', 0)",
                               (chat,))
            await asyncio.sleep(0.01)
            raise RuntimeError("boom")

    results = await asyncio.gather(fails(), *(conv.messages.log_message(chat, "user", f"m{i}") for i in range(10)),
                                   return_exceptions=True)
    assert isinstance(results[0], RuntimeError)
    assert all(isinstance(r, int) for r in results[1:])
    assert sorted(t.text for t in await conv.messages.context(chat, 100)) == sorted(f"m{i}" for i in range(10))


async def test_two_database_objects_on_one_file(tmp_path):
    path = tmp_path / "shared.sqlite3"
    first, second = await Database.open(path), await Database.open(path)
    try:
        async def writer(conv, name):
            chat = await conv.chats.chat("tg", name)
            for i in range(20):
                await conv.messages.log_message(chat, "user", f"{name}:{i}")

        one, two = Store.over(first), Store.over(second)
        await asyncio.gather(*(writer(one, f"a{n}") for n in range(10)), *(writer(two, f"b{n}") for n in range(10)))
        assert (await one.messages.stats())["messages"] == 400
        assert (await two.messages.stats())["chats"] == 20
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(DISTINCT text) FROM messages").fetchone()[0] == 400


async def test_write_waits_out_a_brief_external_lock(tmp_path):
    path = tmp_path / "locked.sqlite3"
    database = await Database.open(path, busy_timeout_ms=50)  # short, so the retry path is used
    try:
        conv = Store.over(database)
        chat = await conv.chats.chat("tg", 1)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        mid = await conv.messages.log_message(chat, "user", "after the lock")
        other.close()
        assert await conv.messages.context(chat, 1) == [StoredTurn("user", "after the lock")]
        assert mid > 0
    finally:
        await database.close()


async def test_write_gives_up_on_a_lock_that_stays(tmp_path):
    path = tmp_path / "locked.sqlite3"
    database = await Database.open(path, busy_timeout_ms=20)
    database.retries, database.retry_delay = 2, 0.01
    other = sqlite3.connect(path, isolation_level=None)
    try:
        conv = Store.over(database)
        chat = await conv.chats.chat("tg", 1)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="locked"):
            await conv.messages.log_message(chat, "user", "never")
        other.execute("ROLLBACK")
        await conv.messages.log_message(chat, "user", "later")  # the connection is still usable
        assert await conv.messages.context(chat, 5) == [StoredTurn("user", "later")]
    finally:
        other.close()
        await database.close()


# --- export for the learning loop -----------------------------------------------------------

NO_FEEDBACK = types.SimpleNamespace(feedback_weighting="off")   # the [learning] key allowed_rows reads

async def test_export_dialogues(db, conv):
    a = await conv.chats.chat("tg", 1)
    opted_out = await conv.chats.chat("tg", 2)
    group = await conv.chats.chat("tg", 3, type="group")
    ann = await conv.chats.user("tg", 10)
    bob = await conv.chats.user("tg", 11)
    cat = await conv.chats.user("tg", 12)

    await exchange(conv, a, cat, ("hi", "hello"), ("how are you", "fine"))
    await conv.messages.reset(a)
    await conv.messages.log_message(a, "user", "new topic", user_id=cat)
    await conv.messages.log_message(a, "user", "really", user_id=cat)          # merged with the previous turn
    await conv.messages.log_message(a, "bot", "lost", status="failed")         # never exported
    await conv.messages.log_message(a, "bot", "tell me")
    first_part_end = await conv.messages.max_message_id()

    await exchange(conv, opted_out, cat, ("private stuff", "ok"))
    await conv.chats.set_consent(opted_out, False)

    await exchange(conv, group, bob, ("bob one", "bot one"))
    await exchange(conv, group, ann, ("ann secret", "bot to ann"))
    await exchange(conv, group, bob, ("bob two", "bot two"))
    await conv.messages.forget_user("tg", 10)  # removes Ann's group messages and the bot's replies to them

    dialogues = await allowed_dialogues(conv, NO_FEEDBACK, [])
    assert [(d.chat_id, d.turns()) for d in dialogues] == [
        (a, ["hi", "hello", "how are you", "fine"]),
        (a, ["new topic\nreally", "tell me"]),
        (group, ["bob one", "bot one", "bob two", "bot two"]),
    ]
    assert dialogues[1].last_id == first_part_end
    assert [d.last_id for d in dialogues] == sorted(d.last_id for d in dialogues)
    assert dialogues[0].last_id < dialogues[1].rows[0].id

    later = await conv.trust.training_rows(after_message_id=first_part_end)
    assert {r["chat_id"] for r in later} == {group}      # only chats with something new, opted in

    # Opted-out chats and forgotten users count for nothing.
    assert await conv.messages.count_user_messages() == 2 + 2 + 2
    assert await conv.messages.count_user_messages(after_message_id=first_part_end) == 2


async def test_export_splits_at_long_silences(db, conv):
    chat = await conv.chats.chat("tg", 1)
    ids = await exchange(conv, chat, None, ("morning", "hi"), ("evening", "hey"))
    async with db.transaction() as conn:
        for n, mid in enumerate(ids):
            await conn.execute("UPDATE messages SET created_at = ? WHERE id = ?",
                               (1000.0 + n * 60 + (7200 if n >= 2 else 0), mid))
    assert [d.turns() for d in await allowed_dialogues(conv, NO_FEEDBACK, [])] == [["morning", "hi"], ["evening", "hey"]]


# --- the storage protocol ---------------------------------------------------------------------

class ProtocolOnly:
    """A backend with nothing but storage.protocol.StorageBackend's members (over SQLite), so the
    stores are shown to need no more: what a second backend must implement."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.path = db.path

    async def fetchall(self, sql, params=()):
        return await self._db.fetchall(sql, params)

    async def fetchone(self, sql, params=()):
        return await self._db.fetchone(sql, params)

    def transaction(self):
        return self._db.transaction()

    async def user_version(self):
        return await self._db.user_version()

    async def compact_wal(self):
        return await self._db.compact_wal()

    async def close(self):
        await self._db.close()


async def test_every_store_works_over_the_protocol_alone(tmp_path):
    from storage.protocol import StorageBackend

    database = await Database.open(tmp_path / "p.sqlite3")
    assert isinstance(database, StorageBackend)
    backend = ProtocolOnly(database)
    assert isinstance(backend, StorageBackend)
    store = Store.over(backend)
    try:
        chat = await store.chats.chat("tg", 1, title="t")
        ann = await store.chats.user("tg", 10, name="Ann")
        asked = await store.messages.log_message(chat, "user", "hello", user_id=ann, platform_message_id=5)
        await store.messages.log_message(chat, "bot", "hi", reply_to_id=asked)
        assert await store.messages.seen_message(chat, 5) == (asked, True)
        await store.messages.reset(chat)
        assert [r["epoch"] for r in await store.trust.training_rows()] == [0, 0]
        run = await store.runs.start_training_run("test")
        await store.runs.update_training_run(run, status="done", finished=True)
        assert (await store.runs.training_run(run))["status"] == "done"
        await store.audit.record("tg", 10, "status", "", True)
        assert len(await store.audit.recent()) == 1
        await store.trust.set_user_consent("tg", 10, False)
        assert await store.messages.forget_user("tg", 10) == 1
        assert await store.messages.stats() == {"chats": 1, "users": 1, "messages": 0}
    finally:
        await store.close()


async def test_export_leaves_out_accounts_too_new_to_train(db, conv):
    """`mynah export` shows what a run would train on now: min_account_age_hours included."""
    chat_old = await conv.chats.chat("tg", 21)
    chat_new = await conv.chats.chat("tg", 22)
    old = await conv.chats.user("tg", 31)
    new = await conv.chats.user("tg", 32)
    async with conv.db.transaction() as c:
        await c.execute("UPDATE users SET created_at = created_at - ? WHERE id = ?", (48 * 3600, old))
    await exchange(conv, chat_old, old, ("an established account", "welcome back"))
    await exchange(conv, chat_new, new, ("a brand new account", "hello"))
    lc = types.SimpleNamespace(feedback_weighting="off", min_account_age_hours=24)
    assert [d.turns() for d in await allowed_dialogues(conv, lc, [])] == [["an established account", "welcome back"]]
    lc.min_account_age_hours = 0
    assert len(await allowed_dialogues(conv, lc, [])) == 2


async def test_export_masks_the_phrase_a_coordinated_group_pushes(db, conv):
    """`mynah export` applies a run's coalition masking: data exported to train elsewhere does
    not carry a group's catchphrase either (issue 19's defence, not bypassed by exporting)."""
    from scripts.puppet_sim import PAYLOAD

    for n in range(4):
        chat = await conv.chats.chat("tg", 40 + n)
        user = await conv.chats.user("tg", 50 + n)
        await exchange(conv, chat, user, (f"hello there , {PAYLOAD} !", "hi"), (f"so {PAYLOAD} again", "ok"))
    honest_chat, honest = await conv.chats.chat("tg", 60), await conv.chats.user("tg", 70)
    await exchange(conv, honest_chat, honest, ("my cat likes the sun", "cats do"))
    text = " ".join(" ".join(d.turns()) for d in await allowed_dialogues(conv, NO_FEEDBACK, []))
    assert PAYLOAD not in text and "[phrase]" in text
    assert "my cat likes the sun" in text
