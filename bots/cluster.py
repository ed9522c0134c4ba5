"""One worker among several on a shared PostgreSQL database ([storage] url).

`Presence` is this process's seat: a heartbeat row in `workers` (alive, the version it
serves, last seen), a loop that takes over the platform updates a dead worker left
unfinished, and the helpers the adapters use to claim an update (exactly one worker
handles each delivery) and to take a job's lease (one learner, one Telegram poller).

With SQLite there is one worker by construction and no Presence (app.cluster is None);
every caller treats None as "alone".
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from storage.cluster import CLAIM_DONE, CLAIM_MINE, ClusterStore

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, store: ClusterStore, *, heartbeat_s: float = 5.0, stale_after_s: float = 20.0,
                 version=lambda: None):
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s          # silent this long: dead (its claims and leases go)
        self.version = version                      # () -> the model version this worker serves
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}:{secrets.token_hex(3)}"
        self.takeovers: dict[str, object] = {}      # platform -> async fn(update_key, payload)
        self.on_beat: list = []                      # async fns run after each heartbeat (lease renewals)
        self._task: asyncio.Task | None = None

    async def start(self) -> "Presence":
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name="cluster:heartbeat")
        log.info("worker %s joined (heartbeat every %.0f s, dead after %.0f s of silence)", self.id,
                 self.heartbeat_s, self.stale_after_s)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        try:
            await self.store.stopped(self.id)   # the others may take over at once, no need to wait
        except Exception:
            log.warning("worker %s: could not record its stop", self.id)

    async def beat(self) -> None:
        await self.store.heartbeat(self.id, self.host, os.getpid(), self.version())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
                for job in list(self.on_beat):
                    await job()
                await self.take_over()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker %s: heartbeat failed (retrying)", self.id)

    async def take_over(self) -> int:
        """Re-handle the updates dead workers claimed and never finished."""
        taken = 0
        for platform, handler in self.takeovers.items():
            for key, payload in await self.store.orphaned(platform, self.id, stale_after=self.stale_after_s):
                log.warning("%s update %s: its worker died before finishing it; handling it here", platform, key)
                await handler(key, payload)
                taken += 1
        return taken

    # --- update claims ----------------------------------------------------------------------
    async def claim(self, platform: str, key: str, payload: str | None, *, wait_s: float = 50.0,
                    poll_s: float = 0.2) -> bool:
        """True: this worker handles the update now. False: another worker stored or finished
        it (acknowledge it, do nothing). Raises TimeoutError when the other worker neither
        stores it nor dies within `wait_s` (do not acknowledge; the platform retries)."""
        deadline = time.monotonic() + wait_s
        while True:
            state = await self.store.claim(platform, key, self.id, stale_after=self.stale_after_s, payload=payload)
            if state == CLAIM_MINE:
                return True
            if state == CLAIM_DONE:
                return False
            found = await self.store.claim_state(platform, key)
            if found is not None and found[1] is not None:   # stored by its owner: it answers (or a survivor)
                return False
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{platform} update {key} is still being stored by another worker")
            await asyncio.sleep(poll_s)

    async def stored(self, platform: str, key: str) -> None:
        await self.store.mark(platform, key, self.id)

    async def done(self, platform: str, key: str) -> None:
        await self.store.mark(platform, key, self.id, done=True)

    # --- leases -----------------------------------------------------------------------------
    async def hold(self, name: str, ttl_s: float | None = None) -> bool:
        """Take or renew lease `name` (it expires after `ttl_s`, the stale time by default)."""
        return await self.store.acquire(name, self.id, ttl_s or self.stale_after_s)

    async def let_go(self, name: str) -> None:
        await self.store.release(name, self.id)


async def open_presence(config, db, version=lambda: None) -> Presence | None:
    """A started Presence when the database is shared (PostgreSQL), else None."""
    if getattr(db, "backend", "sqlite") != "postgresql":
        return None
    s = config.storage
    return await Presence(ClusterStore(db), heartbeat_s=s.heartbeat_seconds, stale_after_s=s.worker_timeout_seconds,
                          version=version).start()
