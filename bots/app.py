"""The composition root: config in, a running engine + database + chat service out.

Every front end (console, Telegram, Discord, several at once) shares one `Mynah`.
"""
from __future__ import annotations

import asyncio
import logging

from bots.chat.service import ChatService
from bots.config import Config
from bots.platforms.base import Platform
from engine.serving.batcher import Engine
from engine.model import LoadedModel, load_model
from engine.serving.protocol import ModelEngine, SamplingParams
from storage.conversations import Conversations
from storage.db import Database

log = logging.getLogger(__name__)


def sampling_defaults(config: Config) -> SamplingParams:
    g = config.generation
    return SamplingParams(
        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty,
        max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, seed=g.seed,
        banned_words=list(g.banned_words),
    )


def build_engine(config: Config, loaded: LoadedModel) -> Engine:
    if config.engine.backend == "ctranslate2":  # optional: faster lone replies on some CPUs (docs/BENCHMARKS.md)
        from engine.serving.ct2_backend import CT2Engine

        return CT2Engine(loaded, sampling_defaults(config), precision="int8" if config.engine.quantize == "int8" else "fp32",
                         max_batch_size=config.engine.max_batch_size, max_queue=config.engine.max_queue,
                         max_context_tokens=config.generation.max_context_tokens,
                         fallback_reply=config.generation.fallback_reply, threads=config.engine.threads)
    return Engine(
        loaded, sampling_defaults(config),
        max_batch_size=config.engine.max_batch_size, max_queue=config.engine.max_queue,
        max_context_tokens=config.generation.max_context_tokens,
        fallback_reply=config.generation.fallback_reply, threads=config.engine.threads,
        fast_path=config.engine.fast_path,
    )


async def wrap_mmi(config: Config, engine: Engine) -> ModelEngine:
    """With [generation] mmi_model set and mmi_candidates > 1: the MMI reranker around the engine."""
    g = config.generation
    if not g.mmi_model:
        return engine
    if g.mmi_candidates < 2:
        log.warning("[generation] mmi_model is set but mmi_candidates = %d: MMI reranking is off", g.mmi_candidates)
        return engine
    from engine.serving.mmi import MMIEngine

    backward = await asyncio.to_thread(load_model, g.mmi_model, device=config.model.device,
                                       quantize=config.engine.quantize)
    log.info("MMI reranking on: %d candidates, weight %.2f, backward model %s", g.mmi_candidates, g.mmi_weight,
             backward.path)
    return MMIEngine(engine, backward, candidates=g.mmi_candidates, weight=g.mmi_weight)


async def load_configured_model(config: Config, path: str | None = None, *, version: str = "") -> LoadedModel:
    m = config.model
    return await asyncio.to_thread(load_model, path or m.path, fmt=m.format, device=m.device,
                                   quantize=config.engine.quantize, version=version)


async def load_active_model(config: Config, registry) -> LoadedModel:
    """With the learning loop on: serve the registry's active version.

    [model] path is registered first (as v0001, or as a new version when it changed since
    it was last registered, so editing config.toml is never silently ignored). An active
    version that no longer loads falls back to the configured model, which becomes active."""
    from engine.model import ModelLoadError

    active, changed = await asyncio.to_thread(registry.ensure_configured, config.model.path)
    if changed:
        log.info("registered [model] path %s as %s (now active)", config.model.path, active.name)
    try:
        return await load_configured_model(config, active.model_path, version=active.name)
    except ModelLoadError:
        fallback = await asyncio.to_thread(registry.configured)
        if fallback is None or fallback.name == active.name:
            raise
        log.exception("the active version %s does not load; falling back to %s (%s)", active.name,
                      fallback.name, fallback.source)
        loaded = await load_configured_model(config, fallback.model_path, version=fallback.name)
        await asyncio.to_thread(registry.set_active, fallback.name, f"fallback: {active.name} did not load")
        return loaded


class Mynah:
    """The shared parts of a running bot. Use `await Mynah.open(config)` / `await app.close()`."""

    def __init__(self, config: Config, db: Database, conversations: Conversations, engine: Engine, chat: ChatService,
                 learning=None):
        self.config = config
        self.db = db
        self.conversations = conversations
        self.engine = engine
        self.chat = chat
        self.learning = learning  # bots.learning.loop.Learning, or None when [learning] enabled = false

    @classmethod
    async def open(cls, config: Config, *, model_path: str | None = None) -> "Mynah":
        registry = None
        if config.learning.enabled and model_path is None:  # an explicit --model bypasses the registry
            from engine.registry import Registry

            registry = Registry(config.learning.registry)
            loaded = await load_active_model(config, registry)
        else:
            loaded = await load_configured_model(config, model_path)
        log.info("model %s loaded (%s, %.1fM parameters, %s format)", loaded.path, loaded.version,
                 loaded.parameters / 1e6, loaded.fmt.name)
        engine = await wrap_mmi(config, build_engine(config, loaded))
        db = await Database.open(config.storage.path)
        conversations = Conversations(db)
        learning = None
        if registry is not None:
            from bots.learning.loop import Learning

            learning = Learning(config, registry, conversations, engine, serving=loaded.version)
        engine.start()
        if learning is not None:
            await learning.start()
        return cls(config, db, conversations, engine, ChatService(config, engine, conversations, learning), learning)

    def attach(self, platform: Platform) -> None:
        """A platform has started: the learning loop may now deliver through it what nobody
        just asked for (a retrain's result reaches the chat that asked for it)."""
        if self.learning is not None:
            self.learning.add_notifier(platform.name, platform.notify)

    async def close(self) -> None:
        """Stop the learning loop (a run in flight is stopped and recorded), finish in-flight
        replies, then close the database."""
        if self.learning is not None:
            await self.learning.stop()
        await self.engine.stop()
        await self.db.close()

    async def __aenter__(self) -> "Mynah":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
