"""`mynah migrate`: bring the configured database's schema up to this Mynah's version.

Every start does the same; this command lets an operator do it first (before rolling out
new workers), and says where the schema stands. On PostgreSQL it holds the migration lock,
so running it while workers start is safe.
"""
from __future__ import annotations

import asyncio
import sys

NAME = "migrate"
HELP = "apply the database schema migrations (also done at every start)"


def add_arguments(parser) -> None:
    pass


async def _migrate(config) -> tuple[int, int]:
    from storage import open_database
    from storage.db import MIGRATIONS

    db = await open_database(config.storage)
    try:
        return await db.user_version(), len(MIGRATIONS)
    finally:
        await db.close()


def run(args) -> int:
    from bots.config import load_config
    from storage import target_of
    from storage.db import StorageError
    from storage import redact

    config = load_config(args.config)
    try:
        version, known = asyncio.run(_migrate(config))
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(f"{redact(target_of(config.storage))}: schema version {version} (this Mynah knows {known})")
    return 0
