"""Issue 25 in storage: /reset spam off the training path, export by the training rules, the
forget ledger across restore, and restore refusing unknown schema objects. Real SQLite files."""
from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest

from storage.store import Store, open_store


async def spam_chat(store: Store, messages: int, resets: int, platform_chat_id: str) -> int:
    """One chat with `messages` messages and `resets` /resets spread through them, bulk-written."""
    chat = await store.chats.chat("telegram", platform_chat_id)
    user = await store.chats.user("telegram", f"u-{platform_chat_id}")
    every = max(1, messages // max(1, resets))
    async with store.db.transaction() as conn:
        for i in range(messages):
            cur = await conn.execute(
                "INSERT INTO messages (chat_id, user_id, role, text, status, created_at) VALUES (?, ?, ?, ?, 'ok', ?)",
                (chat, user if i % 2 == 0 else None, "user" if i % 2 == 0 else "bot", f"m{i}", 1000.0 + i))
            if resets and i % every == 0:
                await conn.execute("INSERT INTO context_resets (chat_id, at_message_id, created_at) VALUES (?, ?, 0)",
                                   (chat, cur.lastrowid))
    return chat


async def _steps(db, work) -> tuple[int, object]:
    """SQLite VM steps (a deterministic cost measure) that `work()` spends on `db`'s connection."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    raw = db.conn._conn
    await db.conn._execute(raw.set_progress_handler, count, 100)
    try:
        result = await work()
    finally:
        await db.conn._execute(raw.set_progress_handler, None, 100)
    return steps, result


async def test_training_rows_cost_follows_messages_not_messages_times_resets(tmp_path):
    """Item 2: the trust export used a per-message COUNT over context_resets."""
    store = await open_store(tmp_path / "m.sqlite3")
    try:
        await spam_chat(store, 4000, 0, "quiet")
        quiet, rows = await _steps(store.trust.reader, store.trust.training_rows)
        assert len(rows) == 4000 and {r["epoch"] for r in rows} == {0}
        await spam_chat(store, 4000, 2000, "spam")
        spammed, rows = await _steps(store.trust.reader, store.trust.training_rows)
        assert len(rows) == 8000
        epochs = [r["epoch"] for r in rows if r["chat_id"] != rows[0]["chat_id"]]
        assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] == 2000   # resets with at < id
        # twice the messages and 2000 resets: about twice the work (the per-message COUNT did
        # ~4000 x 1000 index steps more)
        assert spammed < quiet * 4, (quiet, spammed)
    finally:
        await store.close()


async def test_an_unrelated_write_does_not_wait_for_the_training_read(tmp_path):
    """Item 2: while the trust export reads, another user's message is stored at its usual speed.

    The read is held in the middle of its query (a progress handler that blocks); a write must
    still finish, and take no more than about twice its quiet time."""
    store = await open_store(tmp_path / "m.sqlite3")
    try:
        await spam_chat(store, 3000, 1000, "spam")
        other = await store.chats.chat("telegram", "someone else")

        async def write_times(n: int) -> list[float]:
            out = []
            for i in range(n):
                t = time.perf_counter()
                await store.messages.log_message(other, "user", f"hello {i}")
                out.append(time.perf_counter() - t)
            return out

        baseline = statistics.median(await write_times(15))
        inside, release = threading.Event(), threading.Event()

        def hold() -> int:
            inside.set()
            release.wait(30)
            return 0

        reader = store.trust.reader.conn
        await reader._execute(reader._conn.set_progress_handler, hold, 1000)
        export = asyncio.create_task(store.trust.training_rows())
        try:
            while not inside.is_set():
                await asyncio.sleep(0.005)
            during = await asyncio.wait_for(write_times(15), 20)
            assert not export.done()                              # the read really was in progress
        finally:
            release.set()
        rows = await asyncio.wait_for(export, 30)
        await reader._execute(reader._conn.set_progress_handler, None, 1000)
        assert len(rows) == 3000 + 15                             # one moment: the writes before it began
        assert statistics.median(during) <= 2 * baseline + 0.01, (baseline, during)
    finally:
        await store.close()


# ------------------------------------------------------------------ export = the training rules

def _config(tmp_path, db_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{db_path}"\n[learning]\nmin_account_age_hours = 0\n', encoding="utf-8")
    return config


async def _group_with_an_opted_out_member(path) -> None:
    store = await open_store(path)
    try:
        group = await store.chats.chat("telegram", "-100", type="group", title="friends")
        ann = await store.chats.user("telegram", "ann")
        bob = await store.chats.user("telegram", "bob")
        await store.trust.set_user_consent("telegram", "ann", False)      # Ann's own /optout, in private
        for user, text, reply in ((bob, "anyone seen the match yesterday?", "no, was it good?"),
                                  (ann, "ann's secret after her optout", "oh really?"),
                                  (bob, "/help", "here is my help"),
                                  (bob, "write me at bob@example.com later", "sure thing")):
            asked = await store.messages.log_message(group, "user", text, user_id=user)
            await store.messages.log_message(group, "bot", reply, reply_to_id=asked)
    finally:
        await store.close()


def test_export_leaves_out_a_users_own_optout_and_applies_the_training_rules(tmp_path, capsys):
    """Item 5: a group message sent after the sender's private /optout never leaves in an export."""
    from scripts.cli import main

    db_path = tmp_path / "mynah.sqlite3"
    asyncio.run(_group_with_an_opted_out_member(db_path))
    assert main(["--config", str(_config(tmp_path, db_path)), "export", "--with-ids"]) == 0
    out = capsys.readouterr().out
    assert "ann's secret" not in out and "oh really?" not in out       # her message, and the reply to it
    assert "/help" not in out and "here is my help" not in out          # commands never train either
    assert "bob@example.com" not in out                                 # contacts are masked as for training
    assert "anyone seen the match yesterday?" in out and "sure thing" in out
    assert '"user": "bob"' in out and '"user": "ann"' not in out


# ------------------------------------------------------------------ the forget ledger, restore

SECRET = "ann's address is 12 Elm Street"


async def _ann_and_bob(path):
    store = await open_store(path)
    try:
        chat = await store.chats.chat("telegram", "g", type="group")
        for who, text in (("ann", SECRET), ("bob", "bob was here")):
            user = await store.chats.user("telegram", who, name=who)
            asked = await store.messages.log_message(chat, "user", text, user_id=user)
            await store.messages.log_message(chat, "bot", f"reply to {who}", reply_to_id=asked)
    finally:
        await store.close()


async def _forget(path, who):
    store = await open_store(path)
    try:
        return await store.messages.forget_user("telegram", who)
    finally:
        await store.close()


def _texts(path) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT text FROM messages ORDER BY id")]
    finally:
        conn.close()


@pytest.mark.parametrize("live", ["kept", "deleted"])
def test_restore_forgets_again_what_forget_deleted_after_the_backup(tmp_path, live):
    """Item 6: restoring an older backup must not bring a /forget's messages back, even when the
    live database is gone (the ledger beside it is enough)."""
    import os
    import stat

    from storage.backup import backup, restore
    from storage.ledger import ForgetLedger

    path = tmp_path / "mynah.sqlite3"
    asyncio.run(_ann_and_bob(path))
    old = backup(path, tmp_path / "old.sqlite3").path
    assert asyncio.run(_forget(path, "ann")) == 1
    ledger = ForgetLedger.beside(path)
    raw = ledger.path.read_text()
    assert "ann" not in raw and "Elm" not in raw and len(ledger.entries()) == 1   # a hash and a time, no text
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    if live == "deleted":
        os.unlink(path)
    result = restore(old, path)
    assert result.reforgotten == 1
    assert _texts(path) == ["bob was here", "reply to bob"]
    assert SECRET.encode() not in path.read_bytes()
    # and it stays forgotten for training and export, and a second restore does the same
    assert restore(old, path).reforgotten == 1 and _texts(path) == ["bob was here", "reply to bob"]


def test_restore_keeps_what_a_forgotten_user_wrote_after_forget(tmp_path):
    """A ledger entry covers messages up to the /forget; a backup taken later keeps the newer ones."""
    from storage.backup import backup, restore

    path = tmp_path / "mynah.sqlite3"
    asyncio.run(_ann_and_bob(path))
    asyncio.run(_forget(path, "ann"))

    async def ann_again():
        store = await open_store(path)
        try:
            chat = await store.chats.chat("telegram", "g")
            user = await store.chats.user("telegram", "ann")
            await store.messages.log_message(chat, "user", "ann is back, new topic", user_id=user)
        finally:
            await store.close()

    time.sleep(0.01)
    asyncio.run(ann_again())
    later = backup(path, tmp_path / "later.sqlite3").path
    restore(later, path)
    assert "ann is back, new topic" in _texts(path) and SECRET not in _texts(path)


@pytest.mark.parametrize("extra", [
    "CREATE TABLE shadow (text TEXT)",
    "CREATE VIEW everything AS SELECT text FROM messages",
    "CREATE TRIGGER keep AFTER DELETE ON messages BEGIN INSERT INTO messages_keep VALUES (old.text); END",
])
def test_restore_refuses_schema_objects_it_does_not_know(tmp_path, extra):
    """Item 6: a crafted trigger kept a 'forgotten' message in a shadow table."""
    import sqlite3

    from storage.backup import BackupError, backup, restore

    path = tmp_path / "mynah.sqlite3"
    asyncio.run(_ann_and_bob(path))
    crafted = backup(path, tmp_path / "crafted.sqlite3").path
    conn = sqlite3.connect(crafted)
    if "messages_keep" in extra:
        conn.execute("CREATE TABLE messages_keep (text TEXT)")
    conn.execute(extra)
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(BackupError, match="does not know"):
        restore(crafted, path)
    assert path.read_bytes() == before
