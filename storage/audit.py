"""Every admin command attempt, allowed or refused, for the operator to review."""
from __future__ import annotations

import time

from storage.protocol import StorageBackend

AUDIT_ARGS_MAX = 200   # characters of an admin command's arguments kept in the audit table


class Audit:
    """The admin_audit table."""

    def __init__(self, db: StorageBackend) -> None:
        self.db = db

    async def record(self, platform: str, platform_user_id: str | int, command: str, args: str | None,
                    allowed: bool) -> None:
        """Record an admin command attempt, allowed or refused (arguments cut to AUDIT_ARGS_MAX)."""
        if args is not None and len(args) > AUDIT_ARGS_MAX:
            args = args[:AUDIT_ARGS_MAX - 1] + "…"
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO admin_audit (platform, platform_user_id, command, args, allowed, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (platform, str(platform_user_id), command, args, int(allowed), time.time()))

    async def recent(self, limit: int = 20) -> list[dict]:
        """Newest first."""
        rows = await self.db.fetchall(
            "SELECT id, platform, platform_user_id, command, args, allowed, created_at "
            "FROM admin_audit ORDER BY id DESC LIMIT ?", (limit,))
        return [{**dict(row), "allowed": bool(row["allowed"])} for row in rows]
