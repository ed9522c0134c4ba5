"""What the store classes need from a database: the seam a second backend implements.

Every store (Chats, Messages, Runs, Audit, Feedback, TrustStore) gets one object with this
shape at construction and talks SQL through it; storage/db.py's `Database` (SQLite via
aiosqlite) is the first implementation. A second backend (issue 22: PostgreSQL) keeps the
same SQL code path by implementing these two protocols at the executor level: `?`
placeholders, rows indexable by position and by column name, `lastrowid`/`rowcount` on
what `execute` returns, and one write transaction at a time per process.
"""
from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable


class Cursor(Protocol):
    """What `Connection.execute` returns (awaited)."""

    lastrowid: int | None
    rowcount: int

    async def fetchone(self) -> Any: ...


@runtime_checkable
class Connection(Protocol):
    """The handle a `transaction()` yields: statements run inside that one transaction."""

    async def execute(self, sql: str, parameters: Iterable[Any] = ...) -> Cursor: ...

    async def execute_fetchall(self, sql: str, parameters: Iterable[Any] = ...) -> Iterable[Any]: ...

    async def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Any: ...


@runtime_checkable
class StorageBackend(Protocol):
    """One open database shared by every store of the process.

    Reads (`fetchall`/`fetchone`) never see another coroutine's half-done transaction;
    writes go through `transaction()` (commit on exit, rollback on any exception), and a
    store never calls fetchall/fetchone while it holds a transaction."""

    path: str

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> Sequence[Any]: ...

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Any | None: ...

    def transaction(self) -> AbstractAsyncContextManager[Connection]: ...

    async def user_version(self) -> int:
        """The schema version (SQLite: PRAGMA user_version); migrations only go forward."""
        ...

    async def compact_wal(self) -> bool:
        """Make deleted text leave the disk (after /forget); False when it could not finish now."""
        ...

    async def close(self) -> None: ...
