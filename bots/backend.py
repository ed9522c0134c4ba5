"""Building the remote ReplyEngine for `[engine] backend = "openai"` (docs/SCALING.md).

Which API to use follows the model: chat-template models get /v1/chat/completions; models
without a template (DialoGPT, GPT2-chitchat) get /v1/completions with a prompt in Mynah's
own dialogue format, built with the tokenizer in `[model] path`. That tokenizer is read
from a local folder only: nothing is downloaded. The API key is read from the
environment (MYNAH_ENGINE_API_KEY), registered for redaction, and never logged.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from bots.config import Config, ConfigError
from engine.dialogue import DialogueFormat
from engine.serving.breaker import CircuitBreaker
from engine.serving.openai_backend import OpenAIEngine
from engine.serving.protocol import SamplingParams

log = logging.getLogger(__name__)

API_KEY_ENV = "MYNAH_ENGINE_API_KEY"


def local_dialogue_format(config: Config) -> DialogueFormat:
    """[model] path's dialogue format, from its tokenizer in a local folder."""
    from engine.model import BUILTIN, load_tokenizer, resolve_path

    path = resolve_path(config.model.path) if config.model.path in BUILTIN else config.model.path
    if not Path(path).is_dir():
        raise ConfigError(f'[engine] api = "completions" needs the model\'s tokenizer in a local folder: set [model] '
                          f"path to the folder of the served model (it is not downloaded); {path!r} is not a folder")
    return DialogueFormat(load_tokenizer(path), config.model.format)


def pick_format(config: Config) -> DialogueFormat | None:
    """None: chat completions. A DialogueFormat: text completions in that format."""
    api = config.engine.api
    if api == "chat" or (api == "auto" and config.model.format == "chat_template"):
        return None
    if api == "auto" and not Path(config.model.path).is_dir():
        log.info('engine: [model] path %r is not a local folder, so the backend is asked for chat completions; '
                 'set [model] path to the served model\'s folder (or [engine] api = "completions") for models '
                 "without a chat template", config.model.path)
        return None
    fmt = local_dialogue_format(config)
    if api == "auto" and fmt.name == "chat_template":
        return None
    return fmt


def build_openai_engine(config: Config, defaults: SamplingParams) -> OpenAIEngine:
    e = config.engine
    api_key = os.environ.get(API_KEY_ENV, "").strip() or None
    if api_key:
        from bots.platforms.redaction import register_secret

        register_secret(api_key, f"<{API_KEY_ENV}>")
    return OpenAIEngine(
        e.base_url, e.model, defaults, fmt=pick_format(config), api_key=api_key,
        max_context_tokens=config.generation.max_context_tokens, fallback_reply=config.generation.fallback_reply,
        timeout_s=e.timeout_seconds, retries=e.retries, backoff_s=e.retry_backoff_seconds,
        breaker=CircuitBreaker(e.breaker_failures, e.breaker_cooldown_seconds), max_in_flight=e.max_queue,
        extra_sampling=e.extra_sampling, max_reply_chars=e.max_reply_chars)
