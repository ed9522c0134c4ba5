"""The registry's ``active`` file: which version serves, and the history /rollback walks back.

Replaced atomically (temp file, fsync, ``os.replace``), so a reader always sees a whole
pointer; its (mtime, inode) stamp changes on every write, a cheap poll for running bots.
Writers hold the registry's lock (engine/registry.py); this class only reads and writes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.atomic import write_json_atomic

HISTORY_KEPT = 50


class Pointer:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict:
        """The pointer's fields ({} when missing or unreadable)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def name(self) -> str | None:
        return self.read().get("version")

    def history(self) -> list[str]:
        return list(self.read().get("history") or [])

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the pointer is replaced."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def write(self, name: str, reason: str, *, history: list[str] | None = None) -> None:
        """Point at `name`, appending it to the history (or to `history` when given)."""
        old = self.read()
        hist = list(old.get("history") or []) if history is None else history
        if not hist or hist[-1] != name:
            hist.append(name)
        write_json_atomic(self.path, {"version": name, "previous": old.get("version"),
                                      "history": hist[-HISTORY_KEPT:], "updated_at": time.time(), "reason": reason})
