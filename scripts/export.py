"""`mynah export [--output FILE] [--with-ids]`: the opted-in dialogues as JSON lines.

One dialogue per line: {"turns": [{"role": "user", "text": …}, {"role": "bot", …}, …]}.
The selection is the training export's own (bots.learning.export.allowed_dialogues): opted-in
chats, and only the messages of users who did not /optout themselves; commands, rate-limited
and failed messages, banned words and repeats left out, contact details masked; a chat's
history cut at /reset and at long silences; what /forget removed absent (and filtered again
by id). Chat and user ids appear only with --with-ids.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

NAME = "export"
HELP = "write the opted-in dialogues as JSON lines (no user ids unless --with-ids)"


def add_arguments(parser) -> None:
    parser.add_argument("--output", "-o", default="-", help="file to write (default: standard output)")
    parser.add_argument("--with-ids", action="store_true", help="add platform, chat and user ids")


async def _chat_keys(db, chat_ids: set[int]) -> dict[int, tuple[str, str, str]]:
    """chats.id -> (platform, platform chat id, thread id)."""
    ids = sorted(chat_ids)
    keys = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for r in await db.fetchall("SELECT id, platform, platform_chat_id, thread_id FROM chats "
                                   f"WHERE id IN ({','.join('?' * len(chunk))})", chunk):
            keys[r[0]] = (r[1], r[2], r[3])
    return keys


def _turns(dialogue) -> list[dict]:
    """Same-side messages merged into one turn, as training merges them; a user turn keeps the
    platform user id of its first message."""
    turns: list[dict] = []
    for row in dialogue.rows:
        if turns and turns[-1]["role"] == row.role:
            turns[-1]["text"] += "\n" + row.text
        else:
            user = row.user.split(":", 1)[1] if row.role == "user" and row.user else None
            turns.append({"role": row.role, "text": row.text, "user": user})
    return turns


async def export_records(store, config, *, with_ids: bool = False) -> list[dict]:
    """The dialogues `mynah export` writes, by the training export's own rules, oldest first."""
    from bots.learning.export import allowed_dialogues

    dialogues = await allowed_dialogues(store, config.learning, list(config.generation.banned_words))
    keys = await _chat_keys(store.db, {d.chat_id for d in dialogues}) if with_ids else {}
    records = []
    for d in dialogues:
        turns = _turns(d)
        if with_ids:
            platform, chat, thread = keys[d.chat_id]
            record = {"platform": platform, "chat": chat, "thread": thread,
                      "first_message_id": d.rows[0].id, "last_message_id": d.last_id,
                      "turns": [{k: v for k, v in t.items() if v is not None} for t in turns]}
        else:
            record = {"turns": [{"role": t["role"], "text": t["text"]} for t in turns]}
        records.append(record)
    return records


def _write(records: list[dict], output: str) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if output == "-":
        sys.stdout.write(lines)
        sys.stdout.flush()
        return
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(lines)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


async def export(config, output: str = "-", *, with_ids: bool = False) -> int:
    """Write the export; returns how many dialogues were written."""
    from storage import is_postgres, target_of
    from storage.db import StorageError
    from storage.store import open_store

    target = target_of(config.storage)
    if not is_postgres(target) and not Path(target).is_file():
        raise StorageError(f"no database at {target}")
    store = await open_store(config.storage)
    try:
        records = await export_records(store, config, with_ids=with_ids)
    finally:
        await store.close()
    _write(records, output)
    return len(records)


def run(args) -> int:
    from bots.config import load_config
    from bots.durations import plural
    from storage.db import StorageError

    config = load_config(args.config)
    try:
        n = asyncio.run(export(config, args.output, with_ids=args.with_ids))
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    if args.output != "-":
        print(f"wrote {plural(n, 'dialogue')} to {args.output}", file=sys.stderr)
    return 0
