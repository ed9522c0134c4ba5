"""Copy the live database out, and put a copy back, without ever leaving a broken file.

Backup uses SQLite's online backup API in ONE step: a single read transaction, so the copy
is one consistent moment of the database, and in WAL mode that read never blocks the bot's
writes (a stepped backup would restart on every write from another connection and might
never finish on a busy bot). The copy is written to a temporary name, checked, switched
to journal_mode=DELETE (one self-contained file) and renamed into place.

Restore checks the backup first (SQLite header, PRAGMA integrity_check, a schema version
this code knows, the tables that version must have, no table, view or trigger it does not
know), copies it next to the live file, re-applies the forget ledger to the copy (so a
/forget made after the backup still holds: storage/ledger.py),
refuses while anything still has the live database open, keeps the old file under a
``.pre-restore-…`` name, and only then renames the copy over it (os.replace, atomic).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from storage.db import MIGRATIONS, Database, StorageError, _statements
from storage.ledger import Entry, ForgetLedger, user_hash
from storage.messages import Messages

SQLITE_HEADER = b"SQLite format 3\x00"


class BackupError(StorageError):
    """A backup or restore that was refused or failed; the message says why and what to do."""


@dataclass
class CheckResult:
    path: Path
    user_version: int
    tables: list[str]
    messages: int
    size_bytes: int


@dataclass
class BackupResult:
    path: Path
    check: CheckResult
    seconds: float


@dataclass
class RestoreResult:
    path: Path
    check: CheckResult
    kept: Path | None      # where the replaced database now lives (None: there was none)
    reforgotten: int = 0   # users in the backup whom the forget ledger made forget again


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)


def _schema_objects(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(type, name) of every table, index, view and trigger but SQLite's own."""
    return {(r[0], r[1]) for r in conn.execute("SELECT type, name FROM sqlite_master")
            if not r[1].startswith("sqlite_")}


def expected_objects(version: int) -> set[tuple[str, str]]:
    """What schema `version` has: the migrations up to it, applied to an empty database."""
    conn = sqlite3.connect(":memory:")
    try:
        for script in MIGRATIONS[:version]:
            for statement in _statements(script):
                conn.execute(statement)
        return _schema_objects(conn)
    finally:
        conn.close()


def check_database(path: str | Path) -> CheckResult:
    """Everything restore insists on; raises BackupError naming the first problem."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise BackupError(f"{path} is not a SQLite database (its header is wrong)")
    try:
        conn = _connect_ro(path)
        try:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError(f"{path} is corrupt: {'; '.join(problems[:5])}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = _schema_objects(conn)
            tables = sorted(name for kind, name in objects if kind == "table")
            messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] if "messages" in tables else 0
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a usable SQLite database: {exc}") from None
    if version < 1:
        raise BackupError(f"{path} has no Mynah schema (user_version 0)")
    if version > len(MIGRATIONS):
        raise BackupError(f"{path} has schema version {version}, newer than this Mynah knows ({len(MIGRATIONS)}); "
                          "upgrade Mynah to restore it")
    expected = expected_objects(version)
    missing = sorted(name for kind, name in expected - objects if kind == "table")
    if missing:
        raise BackupError(f"{path} lacks table(s) its schema version {version} must have: {', '.join(missing)}")
    # A trigger could re-insert what /forget deletes, a view or a stray table could keep it:
    # nothing Mynah's migrations did not create is let in.
    unknown = sorted(f"{kind} {name}" for kind, name in objects - expected if kind != "index")
    if unknown:
        raise BackupError(f"{path} has schema objects Mynah does not know ({', '.join(unknown)}); "
                          "refusing to restore it")
    return CheckResult(path, version, tables, messages, path.stat().st_size)


def _copy(src: sqlite3.Connection, dest: Path) -> None:
    """The online backup in one step (one consistent snapshot), then a standalone file."""
    out = sqlite3.connect(str(dest))
    try:
        src.backup(out, pages=-1)
        out.execute("PRAGMA journal_mode = DELETE")
        out.commit()
    finally:
        out.close()


def _temp_beside(target: Path, tag: str) -> Path:
    """An empty 0600 file next to `target` (SQLite takes an empty file for an empty database).

    The copy holds every private conversation: it is 0600 from the start whatever the umask,
    and keeps that mode when it is renamed into place (a backup, or the restored database)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{tag}-", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, 0o600)
    os.close(fd)
    return Path(name)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(db_path: str | Path, dest: str | Path, *, overwrite: bool = False) -> BackupResult:
    """Copy the database at `db_path` (live or not) to `dest`, consistently."""
    db_path, dest = Path(db_path), Path(dest)
    started = time.monotonic()
    if not db_path.is_file():
        raise BackupError(f"no database at {db_path}")
    if dest.exists() and dest.resolve() == db_path.resolve():
        raise BackupError("the backup file cannot be the database itself")
    if dest.exists() and not overwrite:
        raise BackupError(f"{dest} exists; choose another name or pass --force")
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _temp_beside(dest, "backup")
    try:
        try:
            src = sqlite3.connect(str(db_path), timeout=30.0)
            try:
                src.execute("PRAGMA busy_timeout = 30000")
                _copy(src, tmp)
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise BackupError(f"could not back up {db_path}: {exc}") from None
        check = check_database(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return BackupResult(dest, CheckResult(dest, check.user_version, check.tables, check.messages, check.size_bytes),
                        time.monotonic() - started)


def _ensure_unused(db_path: Path) -> None:
    """Refuse while another connection has the live database open.

    Leaving WAL mode needs the only connection to the file, so it fails while the bot (or
    a retrain, or an export) is running; when it succeeds the WAL is folded in and gone."""
    try:
        conn = sqlite3.connect(str(db_path), timeout=0.2)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {db_path}: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 200")
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        if str(mode).lower() != "delete":
            raise BackupError(f"{db_path} is in use (is the bot running?); stop it before restoring")
    except sqlite3.OperationalError as exc:
        raise BackupError(f"{db_path} is in use ({exc}); stop the bot (and any retrain) before restoring") from None
    except sqlite3.DatabaseError:
        pass  # the live file is itself broken: replacing it is the point
    finally:
        conn.close()


def _live_forgets(db_path: Path) -> list[Entry]:
    """The /forgets the live database recorded (its `forgotten` table), as ledger entries: a
    ledger that missed one (written before the ledger existed) still gets it."""
    if not db_path.is_file():
        return []
    try:
        conn = _connect_ro(db_path)
        try:
            rows = conn.execute("SELECT platform, platform_user_id, forgotten_at FROM forgotten").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return []   # no such table yet, or a damaged file: the ledger file is what is left
    return [Entry(user_hash(p, u), float(at)) for p, u, at in rows]


async def _forget_again(path: Path, entries: list[Entry]) -> int:
    """Apply each entry to the database at `path` (migrated to this Mynah's schema on the way):
    the user's messages up to the entry's time, and the replies to them, go."""
    latest: dict[str, float] = {}
    for e in entries:
        latest[e.user] = max(e.at, latest.get(e.user, e.at))
    db = await Database.open(path)
    try:
        messages = Messages(db)          # no ledger: these are re-applications, not new requests
        users = [(p, u) for p, u in await db.fetchall("SELECT platform, platform_user_id FROM users")
                 if user_hash(p, u) in latest]
        for platform, user in users:
            await messages.forget_user(platform, user, until=latest[user_hash(platform, user)])
        return len(users)
    finally:
        await db.close()


def _reapply_ledger(tmp: Path, db_path: Path) -> int:
    """Re-apply the forget ledger (plus what the live database recorded) to the copy."""
    ledger = ForgetLedger.beside(db_path)
    known = ledger.entries()
    seen = set(known)
    missing = [e for e in _live_forgets(db_path) if e not in seen]
    ledger.extend(missing)
    entries = known + missing
    if not entries:
        return 0
    with concurrent.futures.ThreadPoolExecutor(1) as pool:   # callable from inside an event loop too
        users = pool.submit(asyncio.run, _forget_again(tmp, entries)).result()
    conn = sqlite3.connect(str(tmp))
    try:
        conn.execute("PRAGMA journal_mode = DELETE")   # one self-contained file again, as _copy left it
    finally:
        conn.close()
    return users


def restore(backup_path: str | Path, db_path: str | Path, *, keep_old: bool = True) -> RestoreResult:
    """Replace the database at `db_path` with the checked backup at `backup_path`."""
    backup_path, db_path = Path(backup_path), Path(db_path)
    check = check_database(backup_path)
    db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = _temp_beside(db_path, "restore")
    try:
        try:
            src = _connect_ro(backup_path)
            try:
                _copy(src, tmp)
            finally:
                src.close()
        except sqlite3.Error as exc:
            raise BackupError(f"could not read {backup_path}: {exc}") from None
        reforgotten = _reapply_ledger(tmp, db_path)
        check = dataclasses.replace(check_database(tmp), path=db_path)
        _fsync(tmp)
        kept = None
        if db_path.exists():
            _ensure_unused(db_path)
            if keep_old:
                kept = db_path.with_name(f"{db_path.name}.pre-restore-{time.strftime('%Y%m%d-%H%M%S')}")
                try:
                    os.link(db_path, kept)  # the old file lives on under this name; the rename below is atomic
                except OSError:
                    shutil.copy2(db_path, kept)
                os.chmod(kept, 0o600)   # the old conversations stay private too
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        os.replace(tmp, db_path)
    finally:
        tmp.unlink(missing_ok=True)
    return RestoreResult(db_path, check, kept, reforgotten)
