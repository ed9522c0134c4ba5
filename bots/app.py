"""The composition root: config in, a running engine + database + chat service out.

Every front end (console, Telegram, Discord, several at once) shares one `Mynah`.
"""
from __future__ import annotations

import asyncio
import logging

from bots.chat.service import ChatService
from bots.config import Config, ConfigError
from bots.config import Config
from bots.feedback import FeedbackRecorder
from bots.platforms.base import Platform
from engine.serving.batcher import Engine
from engine.model import LoadedModel, load_model
from engine.serving.protocol import EngineUnavailable, ModelEngine, ReplyEngine, SamplingParams
from storage.conversations import Conversations
from storage.db import Database
from storage.feedback import Feedback

log = logging.getLogger(__name__)


def sampling_defaults(config: Config) -> SamplingParams:
    return SamplingParams.from_settings(config.generation)


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

    first: list[LoadedModel] = []

    def load_first(source: str) -> None:   # a [model] path that does not load is never registered
        m = config.model
        first.append(load_model(source, fmt=m.format, device=m.device, quantize=config.engine.quantize))

    active, changed = await asyncio.to_thread(registry.ensure_configured, config.model.path, check=load_first)
    if changed:
        log.info("registered [model] path %s as %s (now active)", config.model.path, active.name)
    if first:
        first[0].version = active.name
        return first[0]
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


async def open_remote_learning(config: Config, conversations: Conversations, engine):
    """LoRA learning for a served model: the registry's configured version is the backend's own
    base model ([learning] base_model is its local copy, for training and evaluation); promoted
    versions are adapters the backend loads at run time."""
    from bots.learning.loop import Learning
    from engine.registry import Registry

    if not config.learning.base_model:
        raise ConfigError('[learning] method = "lora" with [engine] backend = "openai" needs [learning] base_model: '
                          "a local folder with the weights of the model the backend serves (training and evaluation "
                          "run on it here)")
    registry = Registry(config.learning.registry)
    active, changed = await asyncio.to_thread(registry.ensure_configured, config.learning.base_model)
    if changed:
        log.info("registered [learning] base_model %s as %s (the backend's base model)", config.learning.base_model,
                 active.name)
    learning = Learning(config, registry, conversations, engine)
    await learning.start()
    return learning


class Mynah:
    """The shared parts of a running bot. Use `await Mynah.open(config)` / `await app.close()`."""

    def __init__(self, config: Config, db: Database, conversations: Conversations, engine: ReplyEngine, chat: ChatService,
                 learning=None):
        self.config = config
        self.db = db
        self.conversations = conversations
        self.engine = engine
        self.chat = chat
        self.learning = learning  # bots.learning.loop.Learning, or None when [learning] enabled = false
        self.feedback = FeedbackRecorder(config.feedback, Feedback(db))  # reactions from the adapters

    @classmethod
    async def open(cls, config: Config, *, model_path: str | None = None) -> "Mynah":
        if config.engine.backend == "openai":
            return await cls.open_remote(config)
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
        db = await Database.open(config.storage.path, busy_timeout_ms=config.storage.busy_timeout_ms)
        conversations = Conversations(db)
        learning, replier = None, engine
        if registry is not None:
            from bots.learning.canary import CanaryServing, Router
            from bots.learning.loop import Learning

            replier = Router(engine, conversations)   # serves a canary's share of chats from a second engine
            learning = Learning(config, registry, conversations, engine, serving=loaded.version, canary=CanaryServing(
                replier, FeedbackRecorder(config.feedback, Feedback(db)), lambda candidate: build_engine(config, candidate)))
        engine.start()
        if learning is not None:
            await learning.start()
        return cls(config, db, conversations, engine, ChatService(config, replier, conversations, learning), learning)

    @classmethod
    async def open_remote(cls, config: Config) -> "Mynah":
        """Replies from an OpenAI-compatible server. MMI needs the model in this process, so it
        is off; the learning loop runs only as LoRA learning ([learning] method = "lora"), whose
        versions the server loads as adapters (bots/learning/remote.py)."""
        from bots.backend import build_openai_engine

        learn = config.learning.enabled and config.learning.method == "lora"
        if config.learning.enabled and not learn:
            log.warning('[learning] enabled is ignored: with [engine] backend = "openai" the learning loop needs '
                        '[learning] method = "lora" (and base_model, a local copy of the served model). Chats are '
                        "still logged, so a later run can use them.")
        if config.generation.mmi_model:
            log.warning('[generation] mmi_model is ignored with [engine] backend = "openai" (MMI scores with '
                        "a model in this process)")
        engine = build_openai_engine(config, sampling_defaults(config))
        db = await Database.open(config.storage.path, busy_timeout_ms=config.storage.busy_timeout_ms)
        conversations = Conversations(db)
        engine.start()
        try:
            served = await engine.check()
            if config.engine.model not in served:
                log.warning("engine: the backend serves %s, not [engine] model %r", ", ".join(served) or "nothing",
                            config.engine.model)
        except EngineUnavailable as exc:  # the bot still starts; replies apologise until the backend is up
            log.warning("engine: %s; starting anyway, replies will say so until it is back", exc)
        learning = await open_remote_learning(config, conversations, engine) if learn else None
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
