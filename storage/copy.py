"""Copy every row of one database into another, either backend to either backend.

`mynah copy-storage FROM TO` moves a SQLite file to PostgreSQL (and back). Both sides are
opened (so migrated to the same schema version) first; the destination must hold no rows.
Ids are kept (replies, resets, forgotten-id lists and lineage refer to them), tables go in
foreign-key order, everything is written in ONE destination transaction (a failed copy
leaves nothing behind), and each table's id counter ends at least where the source's was,
so ids deleted by /forget are never handed out again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from storage.db import StorageError

# Every table, parents before children. A migration that adds a table adds it here (a test checks).
TABLES = ["chats", "users", "messages", "context_resets", "model_versions", "training_runs", "admin_audit",
          "forgotten", "version_users", "version_messages", "version_taint", "feedback", "user_facts", "workers", "update_claims",
          "leases", "cluster_state", "rate_windows"]
ID_TABLES = {"chats", "users", "messages", "context_resets", "training_runs", "admin_audit", "forgotten", "feedback", "user_facts"}
CHUNK = 1000


@dataclass
class CopyResult:
    rows: dict[str, int] = field(default_factory=dict)   # table -> rows copied

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def table_names(db) -> set[str]:
    if db.backend == "sqlite":
        rows = await db.fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    else:
        rows = await db.fetchall("SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = current_schema() AND table_name != 'mynah_schema'")
    return {r[0] for r in rows}


async def columns(db, table: str) -> list[str]:
    if db.backend == "sqlite":
        return [r[1] for r in await db.fetchall(f"PRAGMA table_info({table})")]
    rows = await db.fetchall("SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                             "AND table_name = ? ORDER BY ordinal_position", (table,))
    return [r[0] for r in rows]


async def id_counter(db, table: str) -> int:
    """The highest id ever handed out in `table` (at least its current MAX(id))."""
    newest = (await db.fetchone(f"SELECT COALESCE(MAX(id), 0) FROM {table}"))[0]
    if db.backend == "sqlite":
        row = await db.fetchone("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)) \
            if table == "messages" else None
    else:
        row = await db.fetchone(
            f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {await _sequence(db, table)}")
    return max(newest, row[0] if row else 0)


async def _sequence(db, table: str) -> str:
    return (await db.fetchone("SELECT pg_get_serial_sequence(?, 'id')", (table,)))[0]


async def _set_counter(db, conn, table: str, value: int) -> None:
    if value <= 0:
        return
    if db.backend == "sqlite":
        if table == "messages":   # AUTOINCREMENT: its counter lives in sqlite_sequence
            await conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'messages'", (value,))
        return
    await conn.execute(f"SELECT setval('{await _sequence(db, table)}', ?)", (value,))


async def copy_storage(source, dest, *, replace: bool = False, progress=None) -> CopyResult:
    """Copy every row of `source` into the empty `dest` (both open Database-like objects).

    replace=True (restore): `dest`'s rows are deleted first, in the same transaction."""
    src_version, dst_version = await source.user_version(), await dest.user_version()
    if src_version != dst_version:
        raise StorageError(f"schema versions differ ({src_version} and {dst_version}): open both with this Mynah")
    unknown = await table_names(source) - set(TABLES)
    if unknown:
        raise StorageError(f"the source has tables this copy does not know: {', '.join(sorted(unknown))}")
    for table in TABLES:
        if not replace and (await dest.fetchone(f"SELECT COUNT(*) FROM {table}"))[0]:
            raise StorageError(f"the destination is not empty ({table} has rows); copy into a new database")
    result = CopyResult()
    async with dest.transaction() as conn:
        if replace:
            for table in reversed(TABLES):
                await conn.execute(f"DELETE FROM {table}")
        for table in TABLES:
            names = await columns(source, table)
            key = "id" if "id" in names else ", ".join(names)
            insert = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            copied, offset = 0, 0
            while True:
                rows = await source.fetchall(f"SELECT {', '.join(names)} FROM {table} ORDER BY {key} "
                                             "LIMIT ? OFFSET ?", (CHUNK, offset))
                if not rows:
                    break
                await conn.executemany(insert, [tuple(r) for r in rows])
                copied += len(rows)
                offset += len(rows)
            result.rows[table] = copied
            if table in ID_TABLES:
                await _set_counter(dest, conn, table, await id_counter(source, table))
            if progress:
                progress(table, copied)
    return result


async def backup_to_file(source, dest, *, overwrite: bool = False):
    """`mynah backup` of a PostgreSQL database: the same logical content as a SQLite backup
    file (so `mynah restore` and `copy-storage` read it), from one consistent snapshot."""
    import os
    import time
    from pathlib import Path

    from storage.backup import BackupError, BackupResult, _fsync, _temp_beside, check_database
    from storage.db import Database

    started, dest = time.monotonic(), Path(dest)
    if dest.exists() and not overwrite:
        raise BackupError(f"{dest} exists; choose another name or pass --force")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest, "backup")
    try:
        out = await Database.open(tmp)
        try:
            async with source.snapshot() as snap:
                await copy_storage(snap, out)
        finally:
            await out.close()
        _to_single_file(tmp)
        check = check_database(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return BackupResult(dest, check, time.monotonic() - started)


def _to_single_file(path) -> None:
    import sqlite3

    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()


async def restore_from_file(backup_path, dest):
    """`mynah restore` into PostgreSQL: the checked backup file replaces every row, in one
    transaction (the workers see the old data or the new, never a mix). Returns the check."""
    from storage.backup import check_database
    from storage.db import Database

    from storage.messages import Messages

    check = check_database(backup_path)
    latest = ("SELECT platform, platform_user_id, MAX(forgotten_at) FROM forgotten "
              "GROUP BY platform, platform_user_id")
    forgotten = [tuple(r) for r in await dest.fetchall(latest)]
    src = await Database.open(backup_path)   # migrates an older backup forward first
    try:
        known = {(r[0], r[1]): r[2] for r in await src.fetchall(latest)}
        await copy_storage(src, dest, replace=True)
    finally:
        await src.close()
    forgotten = [(p, u, at) for p, u, at in forgotten if known.get((p, u), -1.0) < at]
    # Who ran /forget on the live database stays forgotten: their messages up to then go
    # again (the backup may predate the /forget). SQLite does this with its forget ledger.
    messages = Messages(dest)
    for platform, user, at in forgotten:
        await messages.forget_user(platform, user, until=at)
    return check
