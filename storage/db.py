"""One SQLite file for everything Mynah remembers.

WAL lets readers (exports, /status) run while the bot writes; a busy timeout plus a few
retries rides out another process (the trainer, a CLI) briefly holding the write lock.
The schema is versioned with PRAGMA user_version and only ever migrated forward.
"""
from __future__ import annotations

import asyncio
import os
import sqlite3
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import aiosqlite


class StorageError(Exception):
    """The database cannot be used: not a database, too new, or locked for too long."""


class TransientStorageError(StorageError):
    """The database is briefly out of reach (a lost connection, a server restart): retry the write."""


_VIOLATIONS = {"unique": ("23505", "UNIQUE constraint failed"),
               "foreign key": ("23503", "FOREIGN KEY constraint failed")}


def violates(error: BaseException, kind: str) -> bool:
    """Whether `error`, from either backend, is a "unique" or "foreign key" violation (SQLite
    says so in its message, PostgreSQL in its SQLSTATE)."""
    sqlstate, message = _VIOLATIONS[kind]
    return getattr(error, "sqlstate", None) == sqlstate or (
        isinstance(error, sqlite3.IntegrityError) and message in str(error))


# Each entry is one schema version; entry i moves user_version from i to i + 1.
# Never edit an entry that has shipped: append a new one.
MIGRATIONS: list[str] = [
    # 1: the conversation core.
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_chat_id TEXT NOT NULL,
        thread_id TEXT NOT NULL DEFAULT '',
        type TEXT NOT NULL DEFAULT 'private',
        title TEXT,
        consent INTEGER NOT NULL DEFAULT 1,
        context_start_id INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (platform, platform_chat_id, thread_id)
    );
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        name TEXT,
        is_admin INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        UNIQUE (platform, platform_user_id)
    );
    -- AUTOINCREMENT: ids are never reused after /forget, so "after message id N"
    -- watermarks and context_start_id stay meaningful.
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        text TEXT NOT NULL,
        platform_message_id TEXT,
        reply_to_platform_id TEXT,
        model_version TEXT,
        status TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'pending', 'failed')),
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_chat_id ON messages (chat_id, id);
    CREATE TABLE context_resets (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        at_message_id INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 2: lookups used by /forget and reply detection, plus the learning loop and admin tables.
    """
    CREATE INDEX messages_user ON messages (user_id);
    CREATE INDEX messages_platform_id ON messages (chat_id, platform_message_id);
    CREATE INDEX context_resets_chat ON context_resets (chat_id, at_message_id);
    CREATE TABLE model_versions (
        version TEXT PRIMARY KEY,
        path TEXT NOT NULL,
        created_at REAL NOT NULL,
        metrics_json TEXT,
        note TEXT
    );
    CREATE TABLE training_runs (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        status TEXT NOT NULL DEFAULT 'running',
        data_json TEXT,
        losses_json TEXT,
        decision TEXT,
        error TEXT
    );
    CREATE TABLE admin_audit (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        command TEXT NOT NULL,
        args TEXT,
        allowed INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    -- Who asked to be forgotten and which message ids went with them, so the learning
    -- loop can drop those ids from data it exported before the deletion.
    CREATE TABLE forgotten (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        forgotten_at REAL NOT NULL,
        message_ids TEXT NOT NULL DEFAULT '[]'
    );
    """,
    # 3: a chat's persona (/persona): its system prompt; NULL = [chat] default_persona.
    """
    ALTER TABLE chats ADD COLUMN persona TEXT;
    """,
    # 4: learning you can trust: per-user consent, and which users' and messages' data each
    # model version was trained on (so /forget can find and retire those versions).
    """
    ALTER TABLE users ADD COLUMN consent INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE version_users (
        version TEXT NOT NULL,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        messages INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (version, platform, platform_user_id)
    );
    CREATE INDEX version_users_user ON version_users (platform, platform_user_id);
    CREATE TABLE version_messages (
        version TEXT NOT NULL,
        message_id INTEGER NOT NULL,
        PRIMARY KEY (version, message_id)
    );
    CREATE TABLE version_taint (
        version TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        tainted_at REAL NOT NULL
    );
    """,
    # 5: hardening. SQLite cannot change a CHECK constraint in place, so the messages table
    # is rebuilt (create new, copy, drop, rename, recreate indexes) inside this migration's
    # transaction: status gains 'limited' (over the rate limit: stored, never answered or
    # trained on) and reply_to_id links a bot reply to the user message it answers, so
    # /forget deletes exactly the replies to the forgotten user. The AUTOINCREMENT counter
    # is carried over so ids deleted by /forget are never reused.
    """
    CREATE TABLE messages_new (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'bot')),
        text TEXT NOT NULL,
        platform_message_id TEXT,
        reply_to_platform_id TEXT,
        model_version TEXT,
        status TEXT NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'pending', 'failed', 'limited')),
        created_at REAL NOT NULL,
        reply_to_id INTEGER REFERENCES messages_new(id) ON DELETE SET NULL
    );
    INSERT INTO messages_new (id, chat_id, user_id, role, text, platform_message_id, reply_to_platform_id,
                              model_version, status, created_at)
        SELECT id, chat_id, user_id, role, text, platform_message_id, reply_to_platform_id,
               model_version, status, created_at FROM messages ORDER BY id;
    -- Old bot replies: link each to the user message in the same chat whose platform id it
    -- quoted (that is what reply_to_platform_id held for replies).
    UPDATE messages_new SET reply_to_id = (
        SELECT u.id FROM messages_new u WHERE u.chat_id = messages_new.chat_id AND u.role = 'user'
          AND u.platform_message_id = messages_new.reply_to_platform_id AND u.id < messages_new.id
        ORDER BY u.id DESC LIMIT 1)
    WHERE role = 'bot' AND reply_to_platform_id IS NOT NULL;
    CREATE TEMP TABLE migration_seq AS
        SELECT MAX(seq) AS seq FROM (
            SELECT seq FROM sqlite_sequence WHERE name IN ('messages', 'messages_new')
            UNION ALL SELECT COALESCE(MAX(id), 0) FROM messages_new);
    DELETE FROM sqlite_sequence WHERE name = 'messages_new';
    INSERT INTO sqlite_sequence (name, seq) SELECT 'messages_new', seq FROM migration_seq;
    DROP TABLE migration_seq;
    DROP TABLE messages;
    ALTER TABLE messages_new RENAME TO messages;
    CREATE INDEX messages_chat_id ON messages (chat_id, id);
    CREATE INDEX messages_user ON messages (user_id);
    CREATE INDEX messages_platform_id ON messages (chat_id, platform_message_id);
    CREATE INDEX messages_reply_to ON messages (reply_to_id);
    CREATE INDEX messages_status ON messages (status) WHERE status = 'pending';
    """,
    # 6: how people reacted to each bot reply (explicit reactions/buttons, implicit signals
    # derived from the log); one row per (reply, user, signal), gone with the reply or the user.
    """
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
        kind TEXT NOT NULL CHECK (kind IN ('explicit', 'implicit')),
        signal TEXT NOT NULL,
        value INTEGER NOT NULL CHECK (value IN (-1, 0, 1)),
        created_at REAL NOT NULL,
        UNIQUE (message_id, user_id, signal)
    );
    CREATE INDEX feedback_message ON feedback (message_id, kind);
    CREATE INDEX feedback_user ON feedback (user_id);
    """,
    # 7: what each user told Mynah about themselves (storage/memory.py): put in the prompt,
    # shown by /memory, deleted by /memory clear and /forget, never trained on.
    """
    CREATE TABLE user_facts (
        id INTEGER PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (user_id, kind, value)
    );
    CREATE INDEX user_facts_user ON user_facts (user_id, updated_at);
    """,
    # 8 (issue 24): several workers on one database.
    # workers: each `mynah run` process and its heartbeat; update_claims: which worker handles
    # a platform update (one row per update id: a second delivery finds it taken; `payload`
    # lets a survivor re-handle what a dead worker left unfinished); leases: one holder at a
    # time for a named job (the learner) until it expires; cluster_state: small shared facts
    # (the registered webhook's fingerprint, the active model version); rate_windows: each
    # user's messages per rate-limit window, counted across workers (storage/rates.py).
    """
    CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        last_seen REAL NOT NULL,
        version TEXT,
        stopped_at REAL
    );
    CREATE TABLE update_claims (
        platform TEXT NOT NULL,
        update_key TEXT NOT NULL,
        worker TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        stored_at REAL,
        done_at REAL,
        payload TEXT,
        PRIMARY KEY (platform, update_key)
    );
    CREATE INDEX update_claims_open ON update_claims (worker) WHERE done_at IS NULL;
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        acquired_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE cluster_state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE rate_windows (
        key TEXT NOT NULL,
        window_start REAL NOT NULL,
        events INTEGER NOT NULL,
        noticed_at REAL,
        PRIMARY KEY (key, window_start)
    );
    """,
    # 9: one stored copy of each platform message and one live answer to it, kept by the
    # database itself: two workers that both handle one delivery (a live worker taken for
    # dead under load) can no longer store a message twice or confirm two replies to it.
    # Copies from before keep their text; a later copy loses only its platform id (it was
    # never the one redelivery checks found), a second live answer becomes 'failed' (out of
    # context and training, as it should have been).
    """
    UPDATE messages SET platform_message_id = NULL
    WHERE role = 'user' AND platform_message_id IS NOT NULL AND id NOT IN (
        SELECT MIN(id) FROM messages WHERE role = 'user' AND platform_message_id IS NOT NULL
        GROUP BY chat_id, platform_message_id);
    CREATE UNIQUE INDEX messages_one_copy ON messages (chat_id, platform_message_id)
        WHERE role = 'user' AND platform_message_id IS NOT NULL;
    UPDATE messages SET status = 'failed'
    WHERE role = 'bot' AND status IN ('ok', 'pending') AND reply_to_id IS NOT NULL AND id NOT IN (
        SELECT COALESCE(MIN(CASE WHEN status = 'ok' THEN id END), MIN(id)) FROM messages
        WHERE role = 'bot' AND status IN ('ok', 'pending') AND reply_to_id IS NOT NULL GROUP BY reply_to_id);
    CREATE UNIQUE INDEX messages_one_answer ON messages (reply_to_id)
        WHERE role = 'bot' AND status IN ('ok', 'pending');
    """,
]


def _statements(script: str) -> list[str]:
    """Split a script into statements (executescript would commit our transaction)."""
    statements, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n\t;"):
                statements.append(current.strip())
            current = ""
    return statements


def _create_private(path: Path) -> None:
    """Create a missing database file 0600 (and its folder 0700) whatever the umask.

    The file holds private conversations; SQLite gives the -wal and -shm files the
    database file's permissions, so they are private too."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:   # another process created it meanwhile
            pass


def _is_locked(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


class Database:
    """One aiosqlite connection shared by every coroutine of the process.

    Write through `transaction()`; it serializes coroutines with a lock, because SQLite
    has one transaction per connection and interleaved BEGINs would mix their writes.
    """

    backend = "sqlite"
    retries = 5            # extra BEGIN attempts after busy_timeout gave up
    retry_delay = 0.05     # seconds, doubled each attempt

    def __init__(self, conn: aiosqlite.Connection, path: str) -> None:
        self.conn = conn
        self.path = path
        self.busy_timeout_ms = 5000
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, *, busy_timeout_ms: int = 5000) -> "Database":
        path = str(path)
        if path != ":memory:":
            try:
                _create_private(Path(path))
            except OSError as e:   # a folder that cannot exist (/proc/...), no permission, a full disk
                raise StorageError(f"cannot create {path}: {e.strerror or e}") from None
        try:
            # isolation_level=None: no implicit transactions; transaction() issues BEGIN itself.
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open {path}: {e}") from e
        conn.row_factory = aiosqlite.Row
        db = cls(conn, path)
        db.busy_timeout_ms = int(busy_timeout_ms)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {db.busy_timeout_ms}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            # /forget must remove text from the file, not just unlink it from the b-tree.
            await conn.execute("PRAGMA secure_delete = ON")
            await db._migrate()
        except StorageError:
            await conn.close()
            raise
        except sqlite3.DatabaseError as e:
            await conn.close()
            raise StorageError(f"cannot use {path} as a SQLite database: {e}; if it is damaged, put a "
                               "backup back with `mynah restore FILE` (docs/DASHBOARD.md)") from e
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def user_version(self) -> int:
        row = await self.fetchone("PRAGMA user_version")
        return row[0]

    async def _migrate(self) -> None:
        known = len(MIGRATIONS)
        current = await self.user_version()
        if current > known:
            raise StorageError(
                f"{self.path} has schema version {current}, newer than this code knows ({known}); "
                "upgrade Mynah instead of opening it with an old version")
        for version in range(current + 1, known + 1):
            async with self.transaction() as conn:
                # Re-check inside the write lock: another process may have migrated meanwhile.
                (applied,), = await conn.execute_fetchall("PRAGMA user_version")
                if applied >= version:
                    continue
                try:
                    for statement in _statements(MIGRATIONS[version - 1]):
                        await conn.execute(statement)
                except sqlite3.Error as e:
                    raise StorageError(f"{self.path}: migration {version} failed and was rolled back: {e}") from e
                await conn.execute(f"PRAGMA user_version = {version}")

    async def _begin(self) -> None:
        for attempt in range(self.retries + 1):
            try:
                await self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if not _is_locked(e):
                    raise
                if attempt == self.retries:
                    raise StorageError(
                        f"{self.path} stayed locked by another writer; gave up after "
                        f"{self.retries + 1} attempts") from e
                await asyncio.sleep(self.retry_delay * 2 ** attempt)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

        Use the yielded connection inside; do not call fetchone/fetchall (they take the
        same lock and would wait forever).
        """
        async with self._lock:
            await self._begin()
            try:
                yield self.conn
                await self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    await self.conn.rollback()
                raise

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        """A read that never sees another coroutine's half-done transaction."""
        async with self._lock:
            return list(await self.conn.execute_fetchall(sql, tuple(params)))

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> aiosqlite.Row | None:
        """The first row of a query that returns one (a lookup by key, an aggregate, LIMIT 1).

        One trip to aiosqlite's thread (execute and fetch there together) instead of three (execute,
        fetch, close the cursor): every incoming message makes several of these before the engine
        sees it, and each trip waits for the event loop to come round."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def compact_wal(self) -> bool:
        """Checkpoint and empty the WAL so deleted text leaves the disk, not just the tables.

        Best effort with a short wait: False when a reader elsewhere kept it from finishing.
        """
        async with self._lock:
            await self.conn.execute("PRAGMA busy_timeout = 200")
            try:
                async with self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                    busy, _, _ = await cursor.fetchone()
            finally:
                await self.conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
        return busy == 0
