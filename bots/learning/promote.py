"""What the bot serves: promotion, rollback, and noticing a pointer moved by someone else.

The registry's ``active`` pointer is the source of truth. Every change of what is served
goes through one lock and the same order: load the model first (a version that does not
load never becomes active), then move the pointer atomically, then hot-swap the engine,
which takes the new model between batches (in-flight replies finish on the old one). A
`mynah rollback` in another process moves only the pointer; the bot polls its stamp and
follows within [learning] poll_seconds.

With a remote backend (an engine that is a RemoteModelSwitch) the same steps load a LoRA
adapter into the backend instead of weights into this process (bots/learning/remote.py):
an adapter the backend refuses never becomes active.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from bots.learning.remote import RemoteAdapters
from engine.registry import Registry, RegistryError, Version, parse_version, write_json_atomic
from engine.serving.lora_admin import LoraAdminError
from engine.serving.protocol import RemoteModelSwitch

log = logging.getLogger(__name__)

SERVING_FILE = "serving.json"   # {"version", "pid", "at"}: what the running bot serves


class PromotionRefused(RuntimeError):
    """The candidate passed the numbers but cannot be promoted (does not load, pointer moved)."""


class Promoter:
    """Owns the swap lock, the name of the version being served and the pointer's last stamp.
    In a bot (with an engine) what is served is also written to the registry's serving.json,
    so `mynah promote` / `mynah rollback` can answer once the running bot has switched."""

    def __init__(self, config, registry: Registry, engine=None, *, serving: str | None = None):
        self.config = config
        self.registry = registry
        self.engine = engine
        self.serving = serving if serving is not None else (engine.version if engine is not None else None)
        self._lock = asyncio.Lock()
        self._stamp = registry.pointer_stamp()
        self.remote = RemoteAdapters(config, registry, engine) if isinstance(engine, RemoteModelSwitch) else None

    @property
    def serving(self) -> str | None:
        return self._serving

    @serving.setter
    def serving(self, name: str | None) -> None:
        self._serving = name
        if self.engine is not None and name:
            with contextlib.suppress(OSError):
                write_json_atomic(self.registry.root / SERVING_FILE, {"version": name, "pid": os.getpid(),
                                                                      "at": time.time()})

    def stop(self) -> None:
        """The bot stops serving: serving.json goes (the CLI then knows no bot will switch)."""
        if self.engine is not None:
            with contextlib.suppress(OSError):
                (self.registry.root / SERVING_FILE).unlink()

    async def start(self) -> None:
        """Remote backend: serve the active version (its adapter may be gone after a backend restart)."""
        if self.remote is None:
            return
        active = await asyncio.to_thread(self.registry.active)
        if active is None:
            return
        try:
            self.remote.switch(await self.remote.ensure(active), active)
            self.serving = active.name
        except (LoraAdminError, RegistryError) as exc:
            log.error("the backend cannot serve the active version %s (%s); still serving %s",
                      active.name, exc, self.serving)
            return
        await self.remote.tidy({active.name, await asyncio.to_thread(self.registry.previous) or ""})

    def load(self, path: str, version: str):
        """Load a model as the engine would serve it (blocking: call from a thread)."""
        from engine.model import load_model

        return load_model(path, fmt=self.config.model.format, device=self.config.model.device, version=version,
                          quantize=self.config.engine.quantize, lean=self.config.serves_lean())

    async def promote(self, candidate: Path, *, active: Version, run_id: int, trigger: str, through: int,
                      metrics: dict, activate: bool = True) -> Version:
        """Install the candidate as the new active version and serve it; raises PromotionRefused.
        activate=False installs it (checked to load) without serving it: it waits for /promote."""
        async with self._lock:
            if self.remote is not None:
                return await self._promote_remote(candidate, active=active, run_id=run_id, trigger=trigger,
                                                  through=through, metrics=metrics)

            def install() -> Version:
                if self.registry.active_name() != active.name:
                    raise PromotionRefused("the active version changed during the run (a rollback?); "
                                           "the candidate was dropped")
                return self.registry.add_fine_tuned(candidate, parent=active.name, run_id=run_id,
                                                    trained_through=through, metrics=metrics,
                                                    note=f"run #{run_id} ({trigger})", activate=activate,
                                                    awaiting_approval=not activate)

            return await self._switch(str(candidate), "candidate", install, swap=activate,
                                      refused=lambda exc: PromotionRefused(f"the candidate failed to load: {exc}"))

    async def _promote_remote(self, candidate: Path, *, active: Version, run_id: int, trigger: str, through: int,
                              metrics: dict) -> Version:
        """Registered inactive, loaded into the backend under its version name, then made active
        and switched to; a backend that refuses it leaves nothing behind (the version is removed)."""
        if not (candidate / "adapter_config.json").is_file():
            raise PromotionRefused("a model served by a remote backend can only take LoRA adapters; "
                                   "set [learning] method = \"lora\"")
        if await asyncio.to_thread(self.registry.active_name) != active.name:
            raise PromotionRefused("the active version changed during the run (a rollback?); the candidate was dropped")
        version = await asyncio.to_thread(
            self.registry.add_fine_tuned, candidate, parent=active.name, run_id=run_id, trained_through=through,
            metrics=metrics, activate=False, note=f"run #{run_id} ({trigger})")
        try:
            model = await self.remote.ensure(version)
        except (LoraAdminError, RegistryError) as exc:
            await asyncio.to_thread(self.registry.remove, version.name)
            raise PromotionRefused(f"the backend did not load the adapter, so nothing was promoted: {exc}") from exc
        version = await asyncio.to_thread(self.registry.set_active, version.name, f"promoted by run {run_id}")
        self._stamp = self.registry.pointer_stamp()
        previous, self.serving = self.serving, version.name
        self.remote.switch(model, version)
        await self.remote.tidy({version.name, previous or ""})
        return version

    async def _serve_remote(self, version: Version) -> str | None:
        """Remote: the backend's model name for `version` (its adapter loaded first)."""
        try:
            return await self.remote.ensure(version)
        except LoraAdminError as exc:
            raise RegistryError(f"the backend cannot serve {version.name} ({exc}); "
                                f"still serving {self.serving}") from exc

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        """Make `target` (default: the previous version) active now and serve it."""
        async with self._lock:
            name = parse_version(target) if target else await asyncio.to_thread(self.registry.previous)
            if name is None:
                raise RegistryError("there is no previous version to roll back to")
            version = await asyncio.to_thread(self.registry.get, name)
            if self.remote is not None:
                model = await self._serve_remote(version)
                version, old = await asyncio.to_thread(self.registry.rollback, version.name,
                                                       f"rollback by {who}" if who else "")
                self._stamp = self.registry.pointer_stamp()
                demoted, self.serving = self.serving, version.name
                self.remote.switch(model, version)
                if demoted != version.name:
                    await self.remote.unload(demoted)
                return version, old
            return await self._switch(version.model_path, version.name, lambda: self.registry.rollback(
                version.name, f"rollback by {who}" if who else ""), refused=lambda exc: RegistryError(
                f"{version.name} does not load ({exc}); still serving {self.serving}"))

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
            if self.remote is not None:
                return await self._follow_remote(version)
            old = self.serving
            try:
                await self._switch(version.model_path, version.name, lambda: version, refused=RegistryError)
            except RegistryError as exc:
                log.error("the active pointer now names %s, but it does not load (%s); still serving %s",
                          version.name, exc, self.serving)
                return False
            log.info("the active pointer changed: now serving %s (was %s)", version.name, old)
            return True

    async def _follow_remote(self, version: Version) -> bool:
        """check_pointer for a remote backend: load the named adapter, switch, unload the demoted one."""
        try:
            model = await self._serve_remote(version)
        except RegistryError as exc:
            log.error("the active pointer now names %s, but %s", version.name, exc)
            return False
        demoted, self.serving = self.serving, version.name
        self.remote.switch(model, version)
        await self.remote.unload(demoted)
        log.info("the active pointer changed: now serving %s (was %s)", version.name, demoted)
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
            return await self._switch(version.model_path, version.name,
                                      lambda: self.registry.set_active(version.name, reason),
                                      refused=lambda exc: PromotionRefused(f"{version.name} does not load ({exc})"))

    async def _switch(self, path: str, name: str, move, *, refused, swap: bool = True):
        """The one order for every change of what is served, under the caller's lock: load the
        model (`refused(exc)` is raised when it does not load), then `move()` (blocking: the
        pointer, or installing it), then hot-swap the engine. Returns what `move` returned."""
        loaded = None
        if self.engine is not None:
            try:
                loaded = await asyncio.to_thread(self.load, path, name)
            except Exception as exc:
                raise refused(exc) from exc
        moved = await asyncio.to_thread(move)
        if not swap:
            return moved
        self._stamp = self.registry.pointer_stamp()
        version = moved[0] if isinstance(moved, tuple) else moved
        if loaded is not None:
            loaded.version = version.name
            landed = self.engine.swap(loaded)
            if landed is not None:      # answered only once the new model serves (the worker's next batch)
                await asyncio.wrap_future(landed)
        self.serving = version.name
        return moved
