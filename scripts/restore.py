"""`mynah restore FILE`: put a backup back as the live database (the bot must be stopped).

Nothing is replaced until FILE passed every check (integrity, a schema version this Mynah
knows, the tables it must have and no table, view or trigger it does not know) and the forget
ledger was applied to the copy; the old database is kept as `<db>.pre-restore-<time>`.
"""
from __future__ import annotations

import asyncio
import sys

NAME = "restore"
HELP = "replace the database with a checked backup FILE (stop the bot first)"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a file written by `mynah backup`")
    parser.add_argument("--check", action="store_true", help="only check FILE; replace nothing")
    parser.add_argument("--no-keep", action="store_true", help="do not keep the replaced database")


async def _restore_postgres(config, file: str):
    """Every row replaced in one transaction; stop the workers first (they would write meanwhile)."""
    from storage import open_database
    from storage.copy import restore_from_file

    db = await open_database(config.storage)
    try:
        return await restore_from_file(file, db)
    finally:
        await db.close()


def run(args) -> int:
    from bots.config import load_config
    from bots.durations import plural
    from storage.backup import check_database, restore
    from storage.db import StorageError
    from storage import redact

    config = load_config(args.config)
    try:
        if args.check:
            c = check_database(args.file)
            print(f"{args.file}: integrity ok, schema version {c.user_version}, {plural(c.messages, 'message')}")
            return 0
        if config.storage.url:
            check = asyncio.run(_restore_postgres(config, args.file))
            print(f"restored {redact(config.storage.url)} from {args.file} ({plural(check.messages, 'message')})")
            return 0
        result = restore(args.file, config.storage.path, keep_old=not args.no_keep)
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    kept = f"; the old one is kept as {result.kept}" if result.kept else ""
    again = (f"; {plural(result.reforgotten, 'user')} who ran /forget after it was taken forgotten again"
             if result.reforgotten else "")
    print(f"restored {config.storage.path} from {args.file} ({plural(result.check.messages, 'message')}){again}{kept}")
    return 0
