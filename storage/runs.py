"""The learning loop's record: training runs and the model versions it registered."""
from __future__ import annotations

import json
import time

from storage.protocol import StorageBackend


class Runs:
    """The training_runs and model_versions tables."""

    def __init__(self, db: StorageBackend) -> None:
        self.db = db

    async def start_training_run(self, trigger: str, data: dict | None = None) -> int:
        """A new 'running' row; returns its id."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "INSERT INTO training_runs (trigger, started_at, status, data_json) VALUES (?, ?, 'running', ?)",
                (trigger, time.time(), json.dumps(data or {})))
            return cursor.lastrowid

    async def update_training_run(self, run_id: int, *, status: str | None = None, data: dict | None = None,
                                  losses: dict | None = None, decision: str | None = None,
                                  error: str | None = None, finished: bool = False) -> None:
        """Change the given fields (None leaves a field as it is); finished=True stamps finished_at."""
        sets, params = [], []
        for column, value in (("status", status), ("data_json", None if data is None else json.dumps(data)),
                              ("losses_json", None if losses is None else json.dumps(losses)),
                              ("decision", decision), ("error", error)):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        if finished:
            sets.append("finished_at = ?")
            params.append(time.time())
        if not sets:
            return
        async with self.db.transaction() as conn:
            await conn.execute(f"UPDATE training_runs SET {', '.join(sets)} WHERE id = ?", (*params, run_id))

    @staticmethod
    def _run_row(row) -> dict:
        out = dict(row)
        out["data"] = json.loads(out.pop("data_json") or "{}")
        out["losses"] = json.loads(out.pop("losses_json") or "{}")
        out["duration_s"] = (out["finished_at"] - out["started_at"]) if out["finished_at"] else None
        return out

    async def training_runs(self, limit: int = 10) -> list[dict]:
        """Newest first, JSON columns decoded (data, losses) and duration_s added."""
        rows = await self.db.fetchall("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", (limit,))
        return [self._run_row(row) for row in rows]

    async def training_run(self, run_id: int) -> dict | None:
        row = await self.db.fetchone("SELECT * FROM training_runs WHERE id = ?", (run_id,))
        return None if row is None else self._run_row(row)

    async def interrupt_running_runs(self, reason: str) -> list[int]:
        """Mark rows still 'running' (their process died) as 'interrupted'; returns their ids."""
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "UPDATE training_runs SET status = 'interrupted', error = ?, finished_at = ? "
                "WHERE status = 'running' RETURNING id", (reason, time.time()))
        return sorted(row[0] for row in rows)

    async def record_model_version(self, version: str, path: str, created_at: float, metrics: dict | None = None,
                                   note: str | None = None) -> None:
        """Insert or refresh a model_versions row (the registry on disk is the source of truth)."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO model_versions (version, path, created_at, metrics_json, note) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (version) DO UPDATE SET path = excluded.path, metrics_json = excluded.metrics_json, "
                "note = excluded.note", (version, path, created_at, json.dumps(metrics or {}), note))

    async def model_versions(self) -> list[dict]:
        rows = await self.db.fetchall("SELECT * FROM model_versions ORDER BY version")
        return [{**dict(row), "metrics": json.loads(row["metrics_json"] or "{}")} for row in rows]
