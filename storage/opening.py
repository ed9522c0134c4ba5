"""Pick the backend: a `postgresql://` URL opens PostgreSQL, anything else is a SQLite file."""
from __future__ import annotations

from typing import Any

from storage.db import Database
from storage.urls import is_postgres, redact  # noqa: F401  (re-exported)


def target_of(config: Any) -> str:
    """The `[storage]` section's database: its `url` when set, else its SQLite `path`."""
    return getattr(config, "url", "") or str(config.path)


async def open_database(config: Any, *, migrate: bool = True):
    """A migrated Database (SQLite) or PostgresDatabase from a StorageConfig, a URL or a path.

    Both offer the same fetchall / fetchone / transaction, so the store classes take either."""
    if isinstance(config, str) or not hasattr(config, "path"):
        target, busy_timeout_ms = str(config), 5000
    else:
        target, busy_timeout_ms = target_of(config), getattr(config, "busy_timeout_ms", 5000)
    if is_postgres(target):
        from storage.postgres import PostgresDatabase   # asyncpg is imported only when used

        return await PostgresDatabase.open(target, migrate=migrate)
    return await Database.open(target, busy_timeout_ms=busy_timeout_ms)
