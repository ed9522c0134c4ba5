"""What the bot serves: promotion, rollback, and noticing a pointer moved by someone else.

The registry's ``active`` pointer is the source of truth. Every change of what is served
goes through one lock and the same order: load the model first (a version that does not
load never becomes active), then move the pointer atomically, then hot-swap the engine,
which takes the new model between batches (in-flight replies finish on the old one). A
`mynah rollback` in another process moves only the pointer; the bot polls its stamp and
follows within [learning] poll_seconds.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from engine.registry import Registry, RegistryError, Version, parse_version

log = logging.getLogger(__name__)


class PromotionRefused(RuntimeError):
    """The candidate passed the numbers but cannot be promoted (does not load, pointer moved)."""


class Promoter:
    """Owns the swap lock, the name of the version being served and the pointer's last stamp."""

    def __init__(self, config, registry: Registry, engine=None, *, serving: str | None = None):
        self.config = config
        self.registry = registry
        self.engine = engine
        self.serving = serving if serving is not None else (engine.version if engine is not None else None)
        self._lock = asyncio.Lock()
        self._stamp = registry.pointer_stamp()

    def load(self, path: str, version: str):
        """Load a model as the engine would serve it (blocking: call from a thread)."""
        from engine.model import load_model

        return load_model(path, fmt=self.config.model.format, device=self.config.model.device, version=version,
                          quantize=self.config.engine.quantize)

    async def promote(self, candidate: Path, *, active: Version, run_id: int, trigger: str, through: int,
                      metrics: dict) -> Version:
        """Install the candidate as the new active version and serve it; raises PromotionRefused."""
        async with self._lock:
            loaded = None
            if self.engine is not None:
                try:
                    loaded = await asyncio.to_thread(self.load, str(candidate), "candidate")
                except Exception as exc:
                    raise PromotionRefused(f"the candidate failed to load: {exc}") from exc
            if await asyncio.to_thread(self.registry.active_name) != active.name:
                raise PromotionRefused("the active version changed during the run (a rollback?); "
                                       "the candidate was dropped")
            version = await asyncio.to_thread(
                self.registry.add_fine_tuned, candidate, parent=active.name, run_id=run_id,
                trained_through=through, metrics=metrics, note=f"run #{run_id} ({trigger})")
            self._stamp = self.registry.pointer_stamp()
            if loaded is not None:
                loaded.version = version.name
                self.engine.swap(loaded)
            self.serving = version.name
            return version

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        """Make `target` (default: the previous version) active now and serve it."""
        async with self._lock:
            name = parse_version(target) if target else await asyncio.to_thread(self.registry.previous)
            if name is None:
                raise RegistryError("there is no previous version to roll back to")
            version = await asyncio.to_thread(self.registry.get, name)
            loaded = None
            if self.engine is not None:
                try:
                    loaded = await asyncio.to_thread(self.load, version.model_path, version.name)
                except Exception as exc:
                    raise RegistryError(f"{version.name} does not load ({exc}); still serving {self.serving}") from exc
            version, old = await asyncio.to_thread(self.registry.rollback, version.name,
                                                   f"rollback by {who}" if who else "")
            self._stamp = self.registry.pointer_stamp()
            if loaded is not None:
                self.engine.swap(loaded)
            self.serving = version.name
            return version, old

    async def check_pointer(self) -> bool:
        """Serve what the pointer names, if it changed (e.g. `mynah rollback`). True if swapped."""
        stamp = await asyncio.to_thread(self.registry.pointer_stamp)
        if stamp == self._stamp:
            return False
        async with self._lock:
            self._stamp = stamp
            version = await asyncio.to_thread(self.registry.active)
            if version is None or version.name == self.serving or self.engine is None:
                return False
            try:
                loaded = await asyncio.to_thread(self.load, version.model_path, version.name)
            except Exception as exc:
                log.error("the active pointer now names %s, but it does not load (%s); still serving %s",
                          version.name, exc, self.serving)
                return False
            self.engine.swap(loaded)
            log.info("the active pointer changed: now serving %s (was %s)", version.name, self.serving)
            self.serving = version.name
            return True

    async def poll(self) -> None:
        """check_pointer every [learning] poll_seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.config.learning.poll_seconds)
            try:
                await self.check_pointer()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking the active model pointer failed")

    async def activate(self, name: str, reason: str) -> Version:
        """Make an installed version (a canary that passed) active and serve it, under the
        swap lock: loaded first, then the pointer, then the swap (canary.py)."""
        async with self._lock:
            version = await asyncio.to_thread(self.registry.get, name)
            loaded = None
            if self.engine is not None:
                try:
                    loaded = await asyncio.to_thread(self.load, version.model_path, version.name)
                except Exception as exc:
                    raise PromotionRefused(f"{version.name} does not load ({exc})") from exc
            await asyncio.to_thread(self.registry.set_active, version.name, reason)
            self._stamp = self.registry.pointer_stamp()
            if loaded is not None:
                self.engine.swap(loaded)
            self.serving = version.name
            return version
