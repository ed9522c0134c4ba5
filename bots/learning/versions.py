"""The versions side of the learning loop: the SQLite mirror of the registry, rollback
(never to a version /forget retired), following a pointer moved elsewhere, and /models."""
from __future__ import annotations

import asyncio

from bots.learning import report
from bots.learning.promote import Promoter
from engine.registry import Registry, RegistryError, Version, parse_version
from storage.trust import TrustStore


class Versions:
    def __init__(self, registry: Registry, store, promoter: Promoter, lineage: TrustStore):
        self.registry = registry
        self.store = store      # storage.store.Store
        self.promoter = promoter
        self.lineage = lineage

    async def sync(self) -> None:
        """Mirror the registry (the source of truth) into the model_versions table."""
        for v in await asyncio.to_thread(self.registry.versions):
            await self.store.runs.record_model_version(v.name, v.model_path, v.created_at, v.metrics,
                                                          v.note or v.kind)

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        """Make `target` (default: the previous version) active now and serve it; never a
        version /forget retired."""
        name = parse_version(target) if target else await asyncio.to_thread(self.registry.previous)
        if name is not None and name in await self.lineage.tainted():
            raise RegistryError(f"{name} was trained on forgotten data and can never be served")
        return await self.promoter.rollback(target, who=who)

    async def check_pointer(self) -> bool:
        """Serve what the pointer names, if it changed (e.g. `mynah rollback`). True if swapped."""
        return await self.promoter.check_pointer()

    async def models_text(self, limit: int = 15) -> str:
        versions = await asyncio.to_thread(self.registry.versions)
        if not versions:
            return report.NO_VERSIONS
        active = await asyncio.to_thread(self.registry.active_name)
        return report.models_text(versions, active, await self.store.messages.replies_by_version(), limit,
                                  await self.lineage.lineage(), await self.lineage.tainted())
