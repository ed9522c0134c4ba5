"""Promotion and rollback for a model served by a remote backend (vLLM): adapters, not folders.

With the local engine a version is served by loading its weights here and hot-swapping them.
A backend on another machine cannot take weights that way, but vLLM loads LoRA adapters at
run time: promotion loads the new version's adapter under its version name and then switches
requests to that name; rollback switches back to the previous name (its adapter loaded again
if need be; the configured version is the backend's own base model) and unloads the demoted
adapter. Only the registry's pointer says what is active, exactly as for the local engine.
"""
from __future__ import annotations

import logging

from engine.registry import Registry, RegistryError, Version
from engine.serving.lora_admin import LoraAdmin, LoraAdminError, backend_path
from engine.training.lora import adapter_files_ok

log = logging.getLogger(__name__)


class RemoteAdapters:
    """The backend's adapters, seen from the registry."""

    def __init__(self, config, registry: Registry, engine, admin: LoraAdmin | None = None):
        self.config = config
        self.registry = registry
        self.engine = engine
        self.admin = admin or LoraAdmin(engine.base_url)

    def path_for(self, version: Version) -> str:
        """The adapter folder as the backend machine sees it ([learning] adapter_path_prefix)."""
        return backend_path(version.folder, self.registry.root, self.config.learning.adapter_path_prefix)

    async def ensure(self, version: Version) -> str | None:
        """Make `version` servable by the backend; returns the `model` name requests must use
        (None: the backend's base model). Raises LoraAdminError / RegistryError."""
        if version.kind == "configured":
            return None
        if version.kind != "lora":
            raise RegistryError(f"{version.name} is a full fine-tune; a remote backend serves only its base model "
                                "and LoRA adapters ([learning] method = \"lora\")")
        if not adapter_files_ok(version.folder):
            raise RegistryError(f"{version.name} lacks its adapter files in {version.folder}")
        await self.admin.load(version.name, self.path_for(version))
        return version.name

    async def unload(self, name: str | None) -> None:
        """Unload a demoted adapter; a failure is logged (the switch already happened)."""
        if not name:
            return
        try:
            if self.registry.get(name).kind != "lora":
                return
            await self.admin.unload(name)
        except (LoraAdminError, RegistryError) as exc:
            log.warning("could not unload the adapter %s from the backend: %s", name, exc)

    async def tidy(self, keep: set[str]) -> list[str]:
        """Unload this registry's adapters that are loaded but neither active nor the rollback
        target (the backend's adapter slots are few). Others' adapters are left alone."""
        try:
            loaded = await self.admin.loaded()
        except LoraAdminError as exc:
            log.warning("could not list the backend's adapters: %s", exc)
            return []
        ours = {v.name for v in self.registry.versions() if v.kind == "lora"}
        gone = []
        for name in loaded:
            if name in ours and name not in keep:
                await self.unload(name)
                gone.append(name)
        return gone

    def switch(self, model: str | None, version: Version) -> None:
        self.engine.set_served_model(model, version.name)
