"""Every store over one open database, built in one place (the composition root's one call).

Each store gets the database at construction and knows no other store: messages and
context (`Messages`), chats, users and consent (`Chats`), training runs and model versions
(`Runs`), the admin audit (`Audit`), reactions (`Feedback`), learning's consent and
lineage (`TrustStore`) and what users told Mynah about themselves (`Memory`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.audit import Audit
from storage.chats import Chats
from storage.db import Database
from storage.opening import is_postgres, open_database, target_of
from storage.feedback import Feedback
from storage.ledger import ForgetLedger
from storage.memory import Memory
from storage.messages import Messages
from storage.protocol import StorageBackend
from storage.runs import Runs
from storage.trust import TrustStore


@dataclass(frozen=True)
class Store:
    db: StorageBackend
    chats: Chats
    messages: Messages
    runs: Runs
    audit: Audit
    feedback: Feedback
    trust: TrustStore
    memory: Memory          # what each user told Mynah about themselves (never trained on)

    @classmethod
    def over(cls, db: StorageBackend, reader: StorageBackend | None = None) -> "Store":
        """The stores over an already open database (and, optionally, a second connection to
        it for the training read: see TrustStore)."""
        messages = Messages(db, ForgetLedger.beside(db.path))
        return cls(db, Chats(db), messages, Runs(db), Audit(db), Feedback(db), TrustStore(db, reader), Memory(db))

    async def close(self) -> None:
        if self.trust.reader is not self.db:
            await self.trust.reader.close()
        await self.db.close()


async def open_store(path, *, busy_timeout_ms: int = 5000) -> Store:
    """Open (creating and migrating as needed) the database: a SQLite path, a `postgresql://`
    URL, or a [storage] section (its url, else its path). SQLite gets a second connection for
    the training read (not for ":memory:", which would be another database); PostgreSQL's
    pool already reads beside the writers."""
    if not isinstance(path, (str, Path)):
        path, busy_timeout_ms = target_of(path), getattr(path, "busy_timeout_ms", busy_timeout_ms)
    if is_postgres(str(path)):
        return Store.over(await open_database(str(path)))
    db = await Database.open(path, busy_timeout_ms=busy_timeout_ms)
    if str(path) == ":memory:":
        return Store.over(db)
    try:
        reader = await Database.open(path, busy_timeout_ms=busy_timeout_ms)
    except BaseException:
        await db.close()
        raise
    return Store.over(db, reader)
