"""The composition root: config in, a running engine + database + chat service out.

Every front end (the console, each platform served, several at once) shares one `Mynah`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging

from bots.chat.service import ChatService
from bots.config import Config, ConfigError
from bots.feedback import FeedbackRecorder
from bots.platforms.base import Platform
from engine.dialogue import context_limits
from engine.serving.batcher import Engine
from engine.model import LoadedModel, load_model
from engine.serving.protocol import EngineUnavailable, ModelEngine, ReplyEngine, SamplingParams
from storage.db import StorageError
from storage.store import Store, open_store

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
        prefill_threads=config.engine.prefill_threads, fast_path=config.engine.fast_path, pack_weights=config.engine.pack_weights,
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


MMI_OFF_CHAT_TEMPLATE = ("MMI reranks GPT-2-family dialogue models with a backward model trained on the "
                         "same data; a chat-template model has none, and it ends its replies on its own")


def fit_to_model(config: Config, loaded: LoadedModel) -> Config:
    """The config as the loaded model needs it: [generation]'s context limits (engine.dialogue.
    context_limits: chat-template models read at least 12 turns and 1,024 tokens), [learning]
    method "auto" decided (LoRA for chat-template models, full fine-tuning for the GPT-2
    dialogue formats), and MMI off for chat-template models (MMI_OFF_CHAT_TEMPLATE says why)."""
    from engine.types import max_positions

    g, lc, chat = config.generation, config.learning, loaded.fmt.name == "chat_template"
    turns, tokens = context_limits(loaded.fmt.name, max_positions(loaded.model), g.max_history_turns,
                                   g.max_context_tokens, g.max_new_tokens)
    if (turns, tokens) != (g.max_history_turns, g.max_context_tokens):
        log.info("context: the last %d turns and %d tokens (a chat-template model)", turns, tokens)
    mmi = g.mmi_model
    if mmi and chat:
        log.warning("[generation] mmi_model is ignored: %s", MMI_OFF_CHAT_TEMPLATE)
        mmi = ""
    method = lc.method if lc.method != "auto" else ("lora" if chat else "full")
    return dataclasses.replace(
        config, generation=dataclasses.replace(g, max_history_turns=turns, max_context_tokens=tokens, mmi_model=mmi),
        learning=dataclasses.replace(lc, method=method))


async def load_configured_model(config: Config, path: str | None = None, *, version: str = "") -> LoadedModel:
    m = config.model
    return await asyncio.to_thread(load_model, path or m.path, fmt=m.format, device=m.device,
                                   quantize=config.engine.quantize, version=version, lean=config.serves_lean())


async def load_active_model(config: Config, registry) -> LoadedModel:
    """With the learning loop on: serve the registry's active version.

    [model] path is registered first (as v0001, or as a new version when it changed since
    it was last registered, so editing config.toml is never silently ignored). An active
    version that no longer loads falls back to the configured model, which becomes active."""
    from engine.model import ModelLoadError

    first: list[LoadedModel] = []

    def load_first(source: str) -> None:   # a [model] path that does not load is never registered
        m = config.model
        first.append(load_model(source, fmt=m.format, device=m.device, quantize=config.engine.quantize,
                                lean=config.serves_lean()))

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


async def open_remote_learning(config: Config, store: Store, engine):
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
    learning = Learning(config, registry, store, engine)
    await learning.start()
    return learning


async def open_configured_store(config: Config) -> Store:
    """The database at [storage] url (PostgreSQL) or path (SQLite); a StorageError names that
    key, so the operator knows which setting to fix (the command prints it as one line)."""
    try:
        return await open_store(config.storage)
    except StorageError as exc:
        raise StorageError(f"[storage] {'url' if config.storage.url else 'path'}: {exc}") from None


class Mynah:
    """The shared parts of a running bot. Use `await Mynah.open(config)` / `await app.close()`."""

    def __init__(self, config: Config, store: Store, engine: ReplyEngine, chat: ChatService, learning=None):
        self.config = config
        self.store = store
        self.db = store.db
        self.engine = engine
        self.chat = chat
        self.learning = learning  # bots.learning.loop.Learning, or None when [learning] enabled = false
        self.feedback = FeedbackRecorder(config.feedback, store.feedback)  # reactions from the adapters
        self.cluster = None       # bots.cluster.Presence with a shared (PostgreSQL) database, else None

    async def _join(self) -> "Mynah":
        """With PostgreSQL: take a seat among the workers (heartbeat, takeovers, one learner)."""
        from bots.cluster import open_presence, share_learning

        self.cluster = await open_presence(self.config, self.db, version=self.served_version)
        self.chat.admin.cluster = self.cluster
        if self.cluster is not None:      # one rate limit per user across the workers
            from bots.chat.shared_limit import SharedRateLimiter
            from storage.rates import RateStore

            self.chat.shared_limits = SharedRateLimiter(RateStore(self.db), self.chat.limiter)
        if self.cluster is not None and self.learning is not None:
            share_learning(self.cluster, self.learning)
        return self

    def served_version(self) -> str | None:
        return getattr(self.engine, "version", None) or None

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
        config = fit_to_model(config, loaded)
        engine = await wrap_mmi(config, build_engine(config, loaded))
        store = await open_configured_store(config)
        learning, replier = None, engine
        if registry is not None:
            from bots.learning.canary import CanaryServing, Router
            from bots.learning.loop import Learning

            replier = Router(engine, store.chats)   # serves a canary's share of chats from a second engine
            learning = Learning(config, registry, store, engine, serving=loaded.version, canary=CanaryServing(
                replier, FeedbackRecorder(config.feedback, store.feedback), lambda candidate: build_engine(config, candidate)))
        engine.start()
        if learning is not None:
            await learning.start()
        chat = ChatService(config, replier, store, learning)
        if loaded.fmt.name == "chat_template":
            chat.admin.mmi_note = MMI_OFF_CHAT_TEMPLATE
        return await cls(config, store, engine, chat, learning)._join()

    @classmethod
    async def open_remote(cls, config: Config) -> "Mynah":
        """Replies from an OpenAI-compatible server. MMI needs the model in this process, so it
        is off; the learning loop runs only as LoRA learning ([learning] method = "lora"), whose
        versions the server loads as adapters (bots/learning/remote.py)."""
        from bots.backend import build_openai_engine

        if config.learning.method == "auto":   # a served model learns through adapters
            config = dataclasses.replace(config, learning=dataclasses.replace(config.learning, method="lora"))
        learn = config.learning.enabled and config.learning.method == "lora"
        if config.learning.enabled and not learn:
            log.warning('[learning] enabled is ignored: with [engine] backend = "openai" the learning loop needs '
                        '[learning] method = "lora" (and base_model, a local copy of the served model). Chats are '
                        "still logged, so a later run can use them.")
        if config.generation.mmi_model:
            log.warning('[generation] mmi_model is ignored with [engine] backend = "openai" (MMI scores with '
                        "a model in this process)")
        engine = build_openai_engine(config, sampling_defaults(config))
        store = await open_configured_store(config)
        engine.start()
        try:
            served = await engine.check()
            if config.engine.model not in served:
                log.warning("engine: the backend serves %s, not [engine] model %r", ", ".join(served) or "nothing",
                            config.engine.model)
        except EngineUnavailable as exc:  # the bot still starts; replies apologise until the backend is up
            log.warning("engine: %s; starting anyway, replies will say so until it is back", exc)
        learning = await open_remote_learning(config, store, engine) if learn else None
        return await cls(config, store, engine, ChatService(config, engine, store, learning), learning)._join()

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
        if self.cluster is not None:
            await self.cluster.stop()
        await self.store.close()

    async def __aenter__(self) -> "Mynah":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
