"""Every store over one open database, built in one place (the composition root's one call).

Each store gets the database at construction and knows no other store: messages and
context (`Messages`), chats, users and consent (`Chats`), training runs and model versions
(`Runs`), the admin audit (`Audit`), reactions (`Feedback`) and learning's consent and
lineage (`TrustStore`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storage.audit import Audit
from storage.chats import Chats
from storage.db import Database
from storage.feedback import Feedback
from storage.ledger import ForgetLedger
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

    @classmethod
    def over(cls, db: StorageBackend, reader: StorageBackend | None = None) -> "Store":
        """The stores over an already open database (and, optionally, a second connection to
        it for the training read: see TrustStore)."""
        messages = Messages(db, ForgetLedger.beside(db.path))
        return cls(db, Chats(db), messages, Runs(db), Audit(db), Feedback(db), TrustStore(db, reader))

    async def close(self) -> None:
        if self.trust.reader is not self.db:
            await self.trust.reader.close()
        await self.db.close()


async def open_store(path: str | Path, *, busy_timeout_ms: int = 5000) -> Store:
    """Open (creating and migrating as needed) the SQLite database at `path`, with a second
    connection for the training read (not for ":memory:", which would be another database)."""
    db = await Database.open(path, busy_timeout_ms=busy_timeout_ms)
    if str(path) == ":memory:":
        return Store.over(db)
    try:
        reader = await Database.open(path, busy_timeout_ms=busy_timeout_ms)
    except BaseException:
        await db.close()
        raise
    return Store.over(db, reader)
