"""`mynah backup FILE`: a consistent copy of the live database, safe while the bot runs.

Uses SQLite's online backup API (storage/backup.py): the copy is one moment of the
database, checked with PRAGMA integrity_check before it gets its name.
"""
from __future__ import annotations

import sys

NAME = "backup"
HELP = "copy the database to FILE (safe while the bot runs)"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="where to write the copy, e.g. backups/mynah-2025-01-31.sqlite3")
    parser.add_argument("--force", action="store_true", help="overwrite FILE when it exists")


def run(args) -> int:
    from bots.config import load_config
    from bots.durations import plural
    from storage.backup import BackupError, backup

    config = load_config(args.config)
    try:
        result = backup(config.storage.path, args.file, overwrite=args.force)
    except BackupError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    c = result.check
    print(f"backed up {config.storage.path} to {result.path}: {plural(c.messages, 'message')}, schema version "
          f"{c.user_version}, {c.size_bytes / 1e6:.1f} MB, integrity ok ({result.seconds:.1f}s)")
    return 0
