"""Lineage, real forgetting and optional approval: the parts of the learning loop that make
what the model learned answerable to the people it learned from.

- Every promoted version records which users' and which messages' data it was trained on
  (storage/trust.py's tables; the registry keeps each version's parent).
- `/forget` taints every version trained on the user's data and every version fine-tuned
  from a tainted one. If the served version is tainted, the newest untainted ancestor is
  served at once (the promoter's load → pointer → hot-swap path), tainted folders are
  deleted from disk, and (when the served version changed) one rebuild run is queued: all
  forgets within `[learning] rebuild_delay_seconds` share it, so forgetting cannot keep the
  model from improving. The rebuild is a normal run from the (now active) ancestor on what remains.
- With `[learning] require_approval`, a candidate that passes every check is installed but
  not activated; an admin's `/promote vNNNN` (or `mynah promote`) serves it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from bots.chat.events import Incoming, Outgoing
from bots.learning.notify import configured_targets
from bots.learning.runs import AlreadyRunning, Runs
from bots.learning.versions import Versions
from engine.registry import Registry, RegistryError, Version, parse_version
from storage.trust import TrustStore

log = logging.getLogger(__name__)

REBUILD_TRIGGER = "rebuild after /forget"


def tainted_closure(versions: list[Version], seeds: set[str]) -> set[str]:
    """`seeds` and every version fine-tuned (directly or not) from one of them."""
    out = set(seeds)
    changed = True
    while changed:
        changed = False
        for v in versions:
            if v.parent and v.parent in out and v.name not in out:
                out.add(v.name)
                changed = True
    return out


def untainted_ancestor(registry: Registry, start: Version | None, tainted: set[str]) -> Version | None:
    """The newest version on `start`'s parent chain (itself included) that is not tainted."""
    seen = set()
    v = start
    while v is not None and v.name not in seen:
        if v.name not in tainted:
            return v
        seen.add(v.name)
        try:
            v = registry.get(v.parent) if v.parent else None
        except RegistryError:
            v = None
    return None


class Trust:
    """/forget's consequences and /promote's approval; gets every part it acts on."""

    def __init__(self, lc, registry: Registry, store: TrustStore, promoter, versions: Versions, runs: Runs,
                 canary=None):
        self.lc, self.registry, self.store = lc, registry, store
        self.promoter, self.versions, self.runs, self.canary = promoter, versions, runs, canary
        self._rebuild: asyncio.Task | None = None
        self.forgets_waiting = 0

    # ---- lineage ------------------------------------------------------------------------
    async def tainted(self) -> dict[str, str]:
        return await self.store.tainted()

    # ---- /forget ---------------------------------------------------------------------------
    async def forgot(self, platform: str, user_id: str) -> str:
        """After the user's rows are deleted: taint, switch, clean up, queue the rebuild.
        Returns what to tell the user, truthfully."""
        direct = await self.store.versions_trained_on(platform, user_id)
        if not direct:
            return "No model version was trained on your messages, so there is nothing to unlearn."
        versions = await asyncio.to_thread(self.registry.versions)
        bad = tainted_closure(versions, direct) | set(await self.store.tainted())
        await self.store.taint(bad, f"trained on data of a user who ran /forget ({len(direct)} version(s) directly)")
        active = await asyncio.to_thread(self.registry.active)
        text = f"{len(direct)} model version(s) had learned from your messages; they are retired for good."
        canary = self.canary
        if canary is not None and canary.state is not None and canary.state.candidate in bad:
            await canary.retire("a user whose messages it learned from ran /forget")
        switched = active is not None and active.name in bad
        if switched:
            target = await asyncio.to_thread(untainted_ancestor, self.registry, active, bad)
            if target is None:
                return text + " I could not find an earlier version to serve; an admin has to pick one."
            await self.promoter.rollback(target.name, who="/forget")
            text += f" I now serve {target.name}, which never saw them (instead of {active.name})."
        removed = await asyncio.to_thread(self._delete_folders, bad)
        if removed:
            log.info("/forget: deleted tainted versions %s", ", ".join(removed))
        await self.versions.sync()
        if not switched:
            return text + " The version I serve never saw them."
        self.queue_rebuild()
        return text + " A rebuild without your messages is queued."

    def _delete_folders(self, bad: set[str]) -> list[str]:
        """Tainted versions leave the disk once nothing serves them (never the active one)."""
        registry, out = self.registry, []
        active = registry.active_name()
        for v in registry.versions():
            if v.name in bad and v.name != active and v.kind in ("fine-tuned", "lora"):
                with contextlib.suppress(RegistryError, OSError):
                    registry.remove(v.name)
                    out.append(v.name)
        return out

    def queue_rebuild(self) -> None:
        """One rebuild for every forget within the window."""
        self.forgets_waiting += 1
        if self._rebuild is None or self._rebuild.done():
            self._rebuild = asyncio.create_task(self._rebuild_later(), name="mynah-rebuild")

    async def _rebuild_later(self) -> None:
        while True:
            await asyncio.sleep(self.lc.rebuild_delay_seconds)
            waiting, self.forgets_waiting = self.forgets_waiting, 0
            try:
                await self.runs.start(REBUILD_TRIGGER, force=True, notify_to=configured_targets(self.lc.notify))
                log.info("queued rebuild started for %d forget(s)", waiting)
                return
            except AlreadyRunning:
                self.forgets_waiting += waiting  # try again after the run in flight
            except Exception:
                log.exception("the rebuild after /forget could not start")
                return

    async def stop(self) -> None:
        if self._rebuild is not None:
            self._rebuild.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebuild

    # ---- approval ----------------------------------------------------------------------------
    async def command_promote(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        """/promote vNNNN: serve a candidate that passed the gate and waits for approval."""
        if not args:
            return [Outgoing("Usage: /promote vNNNN (a version waiting for approval; /models lists them)",
                             ephemeral=True)]
        try:
            version, old = await self.approve(args[0], who=f"{msg.platform}:{msg.user_id}")
        except RegistryError as exc:
            return [Outgoing(f"Not promoted: {exc}", ephemeral=True)]
        return [Outgoing(f"Promoted: now serving {version.name} (was {old}).", ephemeral=True)]

    async def approve(self, name: str, *, who: str) -> tuple[Version, str | None]:
        name = parse_version(name)
        version = await asyncio.to_thread(self.registry.get, name)
        if name in await self.store.tainted():
            raise RegistryError(f"{name} was trained on forgotten data and can never be served")
        if not version.awaiting_approval:
            raise RegistryError(f"{name} is not waiting for approval (use /rollback to switch versions)")
        result = await self.promoter.rollback(name, who=f"approval by {who}")
        await self.versions.sync()
        return result
