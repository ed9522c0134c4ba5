"""The composition root: config in, a running engine + database + chat service out.

Every front end (console, Telegram, Discord, several at once) shares one `Mynah`.
"""
from __future__ import annotations

import asyncio
import logging

from bots.chat import ChatService
from bots.config import Config
from engine.batcher import Engine
from engine.model import LoadedModel, load_model
from engine.sampling import SamplingParams
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
    return Engine(
        loaded, sampling_defaults(config),
        max_batch_size=config.engine.max_batch_size, max_queue=config.engine.max_queue,
        max_context_tokens=config.generation.max_context_tokens,
        fallback_reply=config.generation.fallback_reply, threads=config.engine.threads,
    )


async def load_configured_model(config: Config, path: str | None = None) -> LoadedModel:
    m = config.model
    return await asyncio.to_thread(load_model, path or m.path, fmt=m.format, device=m.device,
                                   quantize=config.engine.quantize)


class Mynah:
    """The shared parts of a running bot. Use `await Mynah.open(config)` / `await app.close()`."""

    def __init__(self, config: Config, db: Database, conversations: Conversations, engine: Engine, chat: ChatService):
        self.config = config
        self.db = db
        self.conversations = conversations
        self.engine = engine
        self.chat = chat

    @classmethod
    async def open(cls, config: Config, *, model_path: str | None = None) -> "Mynah":
        loaded = await load_configured_model(config, model_path)
        log.info("model %s loaded (%s, %.1fM parameters, %s format)", loaded.path, loaded.version,
                 loaded.parameters / 1e6, loaded.fmt.name)
        db = await Database.open(config.storage.path)
        conversations = Conversations(db)
        engine = build_engine(config, loaded)
        engine.start()
        return cls(config, db, conversations, engine, ChatService(config, engine, conversations))

    async def close(self) -> None:
        """Finish in-flight replies, then close the database."""
        await self.engine.stop()
        await self.db.close()

    async def __aenter__(self) -> "Mynah":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
