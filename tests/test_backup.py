"""`mynah backup`, `mynah restore` and `mynah export` against real SQLite files."""
from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from scripts.cli import main
from storage.backup import BackupError, backup, check_database, restore
from storage.store import Store
from storage.db import MIGRATIONS, Database


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(tmp_path: Path, db: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{db}"\n[learning]\nmin_account_age_hours = 0\n', encoding="utf-8")
    return config


async def seed(db: Database, n: int) -> None:
    """n messages in one transaction (quick), spread over a few chats."""
    conv = Store.over(db)
    chats = [await conv.chats.chat("telegram", f"c{i}") for i in range(5)]
    async with db.transaction() as conn:
        await conn.executemany(
            "INSERT INTO messages (chat_id, role, text, created_at) VALUES (?, ?, ?, 0)",
            [(chats[i % 5], "user" if i % 2 == 0 else "bot", f"seed message {i} " + "x" * 200) for i in range(n)])


async def test_backup_while_messages_arrive_is_consistent_and_complete(tmp_path):
    path = tmp_path / "live.sqlite3"
    db = await Database.open(path)
    await seed(db, 20000)
    conv = Store.over(db)
    chat = await conv.chats.chat("console", "writer")
    committed: list[int] = []
    stop = asyncio.Event()

    async def writer():
        i = 0
        while not stop.is_set():
            committed.append(await conv.messages.log_message(chat, "user", f"live {i}"))
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    try:
        while len(committed) < 20:
            await asyncio.sleep(0.01)
        before = list(committed)                  # everything committed before the backup starts
        result = await asyncio.to_thread(backup, path, tmp_path / "copy.sqlite3")
        during = len(committed) - len(before)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert during > 0, during  # writes went on meanwhile (WAL: the backup blocks no writer)
    assert result.check.user_version == len(MIGRATIONS)
    copy = sqlite3.connect(tmp_path / "copy.sqlite3")
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"   # one self-contained file
        ids = {row[0] for row in copy.execute("SELECT id FROM messages")}
        assert copy.execute("SELECT COUNT(*) FROM messages WHERE text LIKE 'seed message %'").fetchone()[0] == 20000
    finally:
        copy.close()
    assert set(before) <= ids
    assert max(ids) <= max(committed)
    # the live database went on working, and it is still all there
    assert (await db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 20000 + len(committed)
    await db.close()


async def test_backup_refuses_to_overwrite_or_copy_onto_itself(tmp_path):
    path = tmp_path / "live.sqlite3"
    db = await Database.open(path)
    await seed(db, 10)
    await db.close()
    backup(path, tmp_path / "b.sqlite3")
    with pytest.raises(BackupError, match="exists"):
        backup(path, tmp_path / "b.sqlite3")
    backup(path, tmp_path / "b.sqlite3", overwrite=True)
    with pytest.raises(BackupError, match="itself"):
        backup(path, path, overwrite=True)
    with pytest.raises(BackupError, match="no database"):
        backup(tmp_path / "missing.sqlite3", tmp_path / "c.sqlite3")


async def make_backup(tmp_path: Path, n: int = 50) -> tuple[Path, Path]:
    live, saved = tmp_path / "live.sqlite3", tmp_path / "saved.sqlite3"
    db = await Database.open(live)
    await seed(db, n)
    await db.close()
    backup(live, saved)
    return live, saved


def corrupt_copy(source: Path, target: Path) -> Path:
    """Overwrite the middle of the file (b-tree pages) with garbage, keeping the header."""
    data = bytearray(source.read_bytes())
    page = 4096
    for start in range(page, len(data) - page, 2 * page):
        data[start + 100:start + 400] = b"\xde\xad\xbe\xef" * 75
    target.write_bytes(bytes(data))
    return target


async def test_restore_refuses_what_looks_corrupt_and_changes_nothing(tmp_path):
    live, saved = await make_backup(tmp_path, 2000)
    db = await Database.open(live)
    await seed(db, 5)          # the live database differs from the backup
    await db.close()
    before = digest(live)
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello", encoding="utf-8")
    truncated = tmp_path / "truncated.sqlite3"
    truncated.write_bytes(saved.read_bytes()[:5000])
    corrupt = corrupt_copy(saved, tmp_path / "corrupt.sqlite3")
    newer = tmp_path / "newer.sqlite3"
    newer.write_bytes(saved.read_bytes())
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    partial = tmp_path / "partial.sqlite3"
    partial.write_bytes(saved.read_bytes())
    with sqlite3.connect(partial) as conn:
        conn.execute("DROP TABLE forgotten")
    for bad, why in ((not_sqlite, "not a SQLite database"), (truncated, "corrupt|not a usable|malformed"),
                     (corrupt, "corrupt|not a usable|malformed"), (newer, "newer than this Mynah"),
                     (partial, "lacks table.*forgotten"), (tmp_path / "missing", "no such file")):
        with pytest.raises(BackupError, match=why):
            restore(bad, live)
        assert digest(live) == before, bad
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".live")]   # no temp files left behind
    # the CLI says the same and fails
    config = write_config(tmp_path, live)
    assert main(["--config", str(config), "restore", str(corrupt)]) == 1
    assert digest(live) == before


async def test_restore_refuses_while_the_database_is_open(tmp_path):
    live, saved = await make_backup(tmp_path)
    db = await Database.open(live)       # the bot is running
    try:
        with pytest.raises(BackupError, match="in use"):
            await asyncio.to_thread(restore, saved, live)
        assert (await db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 50
    finally:
        await db.close()


async def test_restore_puts_the_backup_back_and_keeps_the_old_file(tmp_path):
    live, saved = await make_backup(tmp_path, 50)
    db = await Database.open(live)
    await seed(db, 7)
    await db.close()
    result = restore(saved, live)
    assert result.kept is not None and result.kept.is_file()
    assert check_database(result.kept).messages == 57          # the replaced database, whole
    db = await Database.open(live)                              # the bot opens the restored file
    try:
        assert (await db.fetchone("SELECT COUNT(*) FROM messages"))[0] == 50
        assert (await db.fetchone("PRAGMA journal_mode"))[0] == "wal"
    finally:
        await db.close()


def seeded_config(tmp_path: Path, n: int) -> Path:
    """A config whose database holds n seeded messages."""
    live = tmp_path / "data" / "mynah.sqlite3"

    async def fill():
        db = await Database.open(live)
        await seed(db, n)
        await db.close()

    asyncio.run(fill())
    return write_config(tmp_path, live)


def test_backup_and_restore_commands(tmp_path, capsys):
    config = seeded_config(tmp_path, 30)
    out = tmp_path / "backups" / "one.sqlite3"
    assert main(["--config", str(config), "backup", str(out)]) == 0
    assert "30 messages" in capsys.readouterr().out and check_database(out).messages == 30
    assert main(["--config", str(config), "backup", str(out)]) == 1          # exists: refused
    assert main(["--config", str(config), "restore", "--check", str(out)]) == 0
    assert main(["--config", str(config), "restore", str(out)]) == 0
    assert "restored" in capsys.readouterr().out


def test_backup_and_restore_say_one_message_not_one_messages(tmp_path, capsys):
    config = seeded_config(tmp_path, 1)
    out = tmp_path / "one.sqlite3"
    assert main(["--config", str(config), "backup", str(out)]) == 0
    assert main(["--config", str(config), "restore", "--check", str(out)]) == 0
    assert main(["--config", str(config), "restore", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("1 message") == 3 and "1 messages" not in printed


# ------------------------------------------------------------------------------- export

SECRET_OPTED_OUT = "my secret from a chat that opted out"
SECRET_FORGOTTEN = "something a forgotten user said"


async def fill_for_export(path: Path) -> None:
    db = await Database.open(path)
    conv = Store.over(db)
    for name, texts in (("kept", ["hello there", "hi! how are you?", "fine thanks", "glad to hear"]),
                        ("optedout", [SECRET_OPTED_OUT, "noted"]),
                        ("forgetme", [SECRET_FORGOTTEN, "I see"])):
        chat = await conv.chats.chat("telegram", f"chat-{name}", type="private")
        user = await conv.chats.user("telegram", f"user-{name}", name=name)
        asked = None
        for i, text in enumerate(texts):
            role = "user" if i % 2 == 0 else "bot"
            stored = await conv.messages.log_message(chat, role, text, user_id=user if role == "user" else None,
                                            reply_to_id=asked if role == "bot" else None)
            asked = stored if role == "user" else None
        if name == "optedout":
            await conv.chats.set_consent(chat, False)
    # a second user in the kept chat, who asks to be forgotten later
    chat = await conv.chats.chat("telegram", "chat-kept")
    other = await conv.chats.user("telegram", "user-forget-2")
    asked = await conv.messages.log_message(chat, "user", SECRET_FORGOTTEN + " (2)", user_id=other)
    await conv.messages.log_message(chat, "bot", "reply to the forgotten one", reply_to_id=asked)   # linked, as the bot stores it
    await conv.messages.forget_user("telegram", "user-forgetme")
    await conv.messages.forget_user("telegram", "user-forget-2")
    await db.close()


def test_export_writes_opted_in_dialogues_only_and_ids_only_on_request(tmp_path, capsys):
    live = tmp_path / "mynah.sqlite3"
    asyncio.run(fill_for_export(live))
    config = write_config(tmp_path, live)
    out = tmp_path / "export.jsonl"
    assert main(["--config", str(config), "export", "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert SECRET_OPTED_OUT not in text and SECRET_FORGOTTEN not in text
    assert "reply to the forgotten one" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert records == [{"turns": [{"role": "user", "text": "hello there"}, {"role": "bot", "text": "hi! how are you?"},
                                  {"role": "user", "text": "fine thanks"}, {"role": "bot", "text": "glad to hear"}]}]
    assert "user-kept" not in text and "chat-kept" not in text
    # --with-ids: chat and user ids appear; the rules stay the same
    assert main(["--config", str(config), "export", "--with-ids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert record["platform"] == "telegram" and record["chat"] == "chat-kept"
    assert record["turns"][0] == {"role": "user", "text": "hello there", "user": "user-kept"}
    assert "user" not in record["turns"][1]
    assert SECRET_OPTED_OUT not in "\n".join(lines) and SECRET_FORGOTTEN not in "\n".join(lines)


async def test_backup_file_and_restored_database_are_private_whatever_the_umask(tmp_path):
    """Issue 25 item 9: a backup holds every private conversation; so does the restored file."""
    import os
    import stat

    path = tmp_path / "live.sqlite3"
    db = await Database.open(path)
    await seed(db, 10)
    await db.close()
    old = os.umask(0o022)
    try:
        copy = backup(path, tmp_path / "backups" / "copy.sqlite3").path
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700        # a new backups folder too
        os.chmod(path, 0o644)                                            # even a live file left world-readable
        restore(copy, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
