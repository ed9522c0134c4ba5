"""`mynah backup FILE`: a consistent copy of the live database, safe while the bot runs.

Uses SQLite's online backup API (storage/backup.py): the copy is one moment of the
database, checked with PRAGMA integrity_check before it gets its name. With PostgreSQL
([storage] url) the copy is the same kind of SQLite file, read from one snapshot
(storage/copy.py), so restore and copy-storage take either.
"""
from __future__ import annotations

import asyncio
import sys

NAME = "backup"
HELP = "copy the database to FILE (safe while the bot runs)"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="where to write the copy, e.g. backups/mynah-2025-01-31.sqlite3")
    parser.add_argument("--force", action="store_true", help="overwrite FILE when it exists")


async def _backup_postgres(config, file: str, force: bool):
    from storage import open_database
    from storage.copy import backup_to_file

    db = await open_database(config.storage)
    try:
        return await backup_to_file(db, file, overwrite=force)
    finally:
        await db.close()


def run(args) -> int:
    from bots.config import load_config
    from bots.durations import plural
    from storage.backup import backup
    from storage.db import StorageError
    from storage import redact

    config = load_config(args.config)
    where = config.storage.path
    try:
        if config.storage.url:
            result = asyncio.run(_backup_postgres(config, args.file, args.force))
            where = redact(config.storage.url)
        else:
            result = backup(config.storage.path, args.file, overwrite=args.force)
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    c = result.check
    print(f"backed up {where} to {result.path}: {plural(c.messages, 'message')}, schema version "
          f"{c.user_version}, {c.size_bytes / 1e6:.1f} MB, integrity ok ({result.seconds:.1f}s)")
    return 0
