"""`mynah export [--output FILE] [--with-ids]`: the opted-in dialogues as JSON lines.

One dialogue per line: {"turns": [{"role": "user", "text": …}, {"role": "bot", …}, …]}.
The selection is the training export's (storage.conversations.export_dialogues): opted-in
chats only, a chat's history cut at /reset and at long silences, messages removed by
/forget absent (and filtered again by id). Chat and user ids appear only with --with-ids.
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


def _turns(dialogue, rows: dict) -> list[dict] | None:
    """Each turn's role (and user) from its first message; None when they do not line up."""
    groups: list[list] = []
    for message_id in dialogue.message_ids:
        row = rows.get(message_id)
        if row is None:
            return None
        if groups and groups[-1][0]["role"] == row["role"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    if len(groups) != len(dialogue.turns):
        return None
    return [{"role": g[0]["role"], "text": text, "user": g[0]["user"]} for g, text in zip(groups, dialogue.turns)]


async def _message_rows(db, ids: list[int]) -> dict:
    rows = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for r in await db.fetchall(
                "SELECT m.id, m.role, c.platform, c.platform_chat_id, c.thread_id, u.platform_user_id "
                "FROM messages m JOIN chats c ON c.id = m.chat_id LEFT JOIN users u ON u.id = m.user_id "
                f"WHERE m.id IN ({','.join('?' * len(chunk))})", chunk):
            rows[r[0]] = {"role": r[1], "platform": r[2], "chat": r[3], "thread": r[4], "user": r[5]}
    return rows


async def export_records(conversations, *, with_ids: bool = False) -> list[dict]:
    """The dialogues `mynah export` writes, oldest first."""
    forgotten = await conversations.forgotten_message_ids()
    dialogues = [d for d in await conversations.export_dialogues() if not forgotten.intersection(d.message_ids)]
    rows = await _message_rows(conversations.db, sorted({i for d in dialogues for i in d.message_ids}))
    records = []
    for d in dialogues:
        turns = _turns(d, rows)
        if turns is None:
            continue  # a message vanished between the two reads (a /forget just now): leave it out
        if with_ids:
            first = rows[d.message_ids[0]]
            record = {"platform": first["platform"], "chat": first["chat"], "thread": first["thread"],
                      "first_message_id": d.first_message_id, "last_message_id": d.last_message_id,
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
    from storage import is_postgres, open_database, target_of
    from storage.conversations import Conversations
    from storage.db import StorageError

    target = target_of(config.storage)
    if not is_postgres(target) and not Path(target).is_file():
        raise StorageError(f"no database at {target}")
    db = await open_database(config.storage)
    try:
        records = await export_records(Conversations(db), with_ids=with_ids)
    finally:
        await db.close()
    _write(records, output)
    return len(records)


def run(args) -> int:
    from bots.config import load_config
    from storage.db import StorageError

    config = load_config(args.config)
    try:
        n = asyncio.run(export(config, args.output, with_ids=args.with_ids))
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    if args.output != "-":
        print(f"wrote {n} dialogues to {args.output}", file=sys.stderr)
    return 0
