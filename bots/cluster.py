"""One worker among several on a shared PostgreSQL database ([storage] url).

`Presence` is this process's seat: a heartbeat row in `workers` (alive, the version it
serves, last seen), a loop that takes over the platform updates a dead worker left
unfinished, and the helpers the adapters use to claim an update (exactly one worker
handles each delivery) and to take a job's lease (one learner, one poller).

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

from storage.cluster import CLAIM_DONE, CLAIM_MINE, CLAIM_TAKEN_OVER, ClusterStore

log = logging.getLogger(__name__)


CLAIMS_KEPT_S = 2 * 24 * 3600   # Telegram redelivers for up to 24 h; a claim older than this is history
CLAIMS_SWEEP_S = 600.0


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
        self._swept = 0.0

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
                if time.monotonic() - self._swept > CLAIMS_SWEEP_S:   # done claims past redelivery age
                    self._swept = time.monotonic()
                    await self.store.forget_claims(older_than=time.time() - CLAIMS_KEPT_S)
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

    async def workers(self, *, within_s: float = 3600.0) -> list[dict]:
        """The workers seen in the last `within_s` seconds: id, host, pid, alive, version, last seen."""
        now = time.time()
        return [{"id": w.id, "host": w.host, "pid": w.pid, "alive": w.alive(now, self.stale_after_s),
                 "version": w.version, "last_seen_s": round(now - w.last_seen, 1), "this": w.id == self.id}
                for w in await self.store.workers(since=now - within_s)]

    async def status_lines(self) -> list[str]:
        """/status: every worker of the last hour, alive or not, and the version it serves."""
        found = await self.workers()
        lines = [f"Workers: {sum(w['alive'] for w in found)} alive of {len(found)} seen in the last hour"]
        for w in found:
            state = "alive" if w["alive"] else "gone"
            lines.append(f"  {w['id']}{' (this one)' if w['this'] else ''}: {state}, serving {w['version'] or '?'}, "
                         f"last seen {w['last_seen_s']:.0f} s ago")
        return lines

    # --- update claims ----------------------------------------------------------------------
    async def claim(self, platform: str, key: str, payload: str | None, *, wait_s: float = 50.0,
                    poll_s: float = 0.2) -> str | None:
        """CLAIM_MINE or CLAIM_TAKEN_OVER (from a dead worker): this worker handles the update
        now. None: another worker stored or finished it (acknowledge it, do nothing). Raises
        TimeoutError when the other worker neither stores it nor dies within `wait_s` (do not
        acknowledge; the platform retries)."""
        deadline = time.monotonic() + wait_s
        while True:
            state = await self.store.claim(platform, key, self.id, stale_after=self.stale_after_s, payload=payload)
            if state in (CLAIM_MINE, CLAIM_TAKEN_OVER):
                return state
            if state == CLAIM_DONE:
                return None
            found = await self.store.claim_state(platform, key)
            if found is not None and found[1] is not None:   # stored by its owner: it answers (or a survivor)
                return None
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


LEARNER_LEASE = "learner"
TIDY_EVERY_S = 10.0     # how often an idle worker looks for runs whose learner died


class ClusterTrainLock:
    """The registry's file lock plus the `learner` lease in the database: one training run
    across every worker even when the shared registry folder's file locks do not reach
    between machines. Same calls as engine.registry.FileLock (acquire runs in a thread).
    The lease is renewed with each heartbeat; a dead learner's lease lapses after the
    worker timeout, and another worker may then run."""

    def __init__(self, presence: Presence, file_lock, loop: asyncio.AbstractEventLoop):
        self.presence, self.file_lock, self.loop = presence, file_lock, loop
        self._held = False

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def acquire(self, *args, **kwargs) -> bool:
        if not self.file_lock.acquire(*args, **kwargs):
            return False
        try:
            won = self._call(self.presence.hold(LEARNER_LEASE))
        except Exception:
            won = False
        if not won:
            self.file_lock.release()
            return False
        self._held = True
        self.presence.on_beat.append(self._renew)
        return True

    async def _renew(self) -> None:
        if self._held and not await self.presence.hold(LEARNER_LEASE):
            log.error("worker %s lost the learner lease while training", self.presence.id)

    def release(self) -> None:
        if self._held:
            self._held = False
            if self._renew in self.presence.on_beat:
                self.presence.on_beat.remove(self._renew)
            try:
                if self.loop.is_running():
                    asyncio.run_coroutine_threadsafe(self.presence.let_go(LEARNER_LEASE), self.loop)
            except RuntimeError:
                pass
        self.file_lock.release()

    def holder(self):
        return self.file_lock.holder() or {"worker": "another worker (the learner lease is held)"}

    def describe(self, info: dict) -> None:
        self.file_lock.describe({**info, "worker": self.presence.id})

    def held(self) -> bool:
        return self._held


CANARY_LEASE = "canary-judge"
CANARY_JUDGE_TTL_S = 600.0   # longer than a judgement (a promotion loads the model); let go right after


def share_learning(presence: Presence, learning) -> None:
    """One learner across the workers: training takes the lease too, and each heartbeat
    (when nothing runs here) marks runs whose learner died as interrupted. Every worker
    serves a canary's share of chats; one at a time judges it (the canary-judge lease)."""
    canary = getattr(learning, "canary", None)
    if canary is not None:
        async def may_judge() -> bool:
            return await presence.hold(CANARY_LEASE, CANARY_JUDGE_TTL_S)

        async def judged() -> None:
            await presence.let_go(CANARY_LEASE)
        canary.may_judge, canary.judged = may_judge, judged
    loop = asyncio.get_running_loop()
    runs = learning.runs
    file_locks = runs.registry.train_lock
    runs.train_lock = lambda: ClusterTrainLock(presence, file_locks(), loop)

    last = [0.0]

    async def tidy() -> None:
        if time.monotonic() - last[0] < TIDY_EVERY_S:
            return
        last[0] = time.monotonic()
        if runs.running is None and await presence.store.holder(LEARNER_LEASE) is None:
            await runs.recover()
    presence.on_beat.append(tidy)


async def open_presence(config, db, version=lambda: None) -> Presence | None:
    """A started Presence when the database is shared (PostgreSQL), else None."""
    if getattr(db, "backend", "sqlite") != "postgresql":
        return None
    s = config.storage
    return await Presence(ClusterStore(db), heartbeat_s=s.heartbeat_seconds, stale_after_s=s.worker_timeout_seconds,
                          version=version).start()
