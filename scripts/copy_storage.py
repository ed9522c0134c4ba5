"""`mynah copy-storage FROM TO`: copy every row from one database to another.

FROM and TO are each a SQLite file path or a `postgresql://USER@HOST:PORT/DB` URL (the
password from MYNAH_DATABASE_PASSWORD or a pgpass file). TO must be empty: this is for
moving a bot from SQLite to PostgreSQL (and back), with the bot stopped.
"""
from __future__ import annotations

import asyncio
import sys

NAME = "copy-storage"
HELP = "copy every row from database FROM to the empty database TO (SQLite path or postgresql:// URL)"


def add_arguments(parser) -> None:
    parser.add_argument("source", metavar="FROM", help="a SQLite file or a postgresql:// URL")
    parser.add_argument("dest", metavar="TO", help="a SQLite file or a postgresql:// URL (must hold no rows)")


async def copy(source: str, dest: str, progress=None):
    from pathlib import Path

    from storage import is_postgres, open_database
    from storage.copy import copy_storage
    from storage.db import StorageError

    if not is_postgres(source) and not Path(source).is_file():
        raise StorageError(f"no database at {source}")
    src = await open_database(source)
    try:
        dst = await open_database(dest)
        try:
            if src.backend == "postgresql":
                async with src.snapshot() as snap:
                    return await copy_storage(snap, dst, progress=progress)
            return await copy_storage(src, dst, progress=progress)
        finally:
            await dst.close()
    finally:
        await src.close()


def run(args) -> int:
    from bots.config import _check_storage_url, ConfigError
    from storage import is_postgres
    from storage.db import StorageError
    from storage import redact

    for target in (args.source, args.dest):
        if is_postgres(target):
            try:
                _check_storage_url(target)
            except ConfigError as exc:
                print(f"mynah: {str(exc).replace('[storage] url', redact(target))}", file=sys.stderr)
                return 2
    try:
        result = asyncio.run(copy(args.source, args.dest,
                                  lambda table, n: print(f"  {table}: {n} rows", file=sys.stderr)))
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(f"copied {result.total} rows from {redact(args.source)} to {redact(args.dest)}")
    return 0
