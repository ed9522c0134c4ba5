"""The forget ledger: who ran /forget and when, kept beside the database so `mynah restore`
cannot bring their messages back.

A restored backup predates some /forgets; restore re-applies every ledger entry to the copy
before it replaces the live file. An entry is a SHA-256 of "platform:user id"
and a time, never text (the ledger outlives what it protects, so it must hold nothing worth
protecting): `<database>.forget-ledger`, JSON lines, 0600, appended and fsynced.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from storage.urls import is_postgres

SUFFIX = ".forget-ledger"


def user_hash(platform: str, platform_user_id: str | int) -> str:
    return hashlib.sha256(f"mynah-forget:{platform}:{platform_user_id}".encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    user: str        # user_hash(platform, platform_user_id)
    at: float        # when they were forgotten: their messages up to then go


class ForgetLedger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, db_path: str | Path) -> "ForgetLedger | None":
        """The ledger of the SQLite file at `db_path` (None for ":memory:")."""
        if str(db_path) == ":memory:" or is_postgres(str(db_path)):
            return None   # PostgreSQL: restore re-applies the live database's `forgotten` rows instead
        return cls(f"{db_path}{SUFFIX}")

    def append(self, platform: str, platform_user_id: str | int, at: float) -> None:
        self.extend([Entry(user_hash(platform, platform_user_id), at)])

    def extend(self, entries) -> None:
        lines = "".join(json.dumps({"user": e.user, "at": e.at}) + "\n" for e in entries)
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, lines.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> list[Entry]:
        """Every entry (a torn last line from a crash is skipped)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                raw = json.loads(line)
                out.append(Entry(str(raw["user"]), float(raw["at"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out
