"""Load and check config.toml into typed sections.

Every value is checked once at startup so a typo or a bad value stops Mynah with a
message naming the key, instead of failing later in the middle of a chat.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from engine.serving.protocol import FALLBACK_REPLY, SamplingParams


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the problem."""


@dataclass
class ModelConfig:
    path: str = "starter"
    format: str = "auto"
    device: str = "auto"


@dataclass
class GenerationConfig:
    # sampling: the engine's own defaults (SamplingParams is the one source) unless config.toml sets them
    temperature: float = SamplingParams.temperature
    top_k: int = SamplingParams.top_k
    top_p: float = SamplingParams.top_p
    repetition_penalty: float = SamplingParams.repetition_penalty
    max_new_tokens: int = SamplingParams.max_new_tokens
    min_new_tokens: int = SamplingParams.min_new_tokens
    max_history_turns: int = 6
    max_context_tokens: int = 256
    banned_words: list = field(default_factory=list)
    seed: int | None = SamplingParams.seed
    fallback_reply: str = FALLBACK_REPLY
    mmi_model: str = ""
    mmi_candidates: int = 1
    mmi_weight: float = 0.5


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    max_queue: int = 256
    threads: int = 0
    quantize: str = "none"
    fast_path: str = "auto"              # "auto": GPT-2-family models decode on the hand-written step; "off"
    backend: str = "local"               # "local": Mynah's engine; "ctranslate2": CTranslate2 (pip install mynah[bench])
    threads_while_training: int = 0      # torch threads while a trainer child runs (0 = leave as is)


@dataclass
class StorageConfig:
    path: str = "data/mynah.sqlite3"


@dataclass
class ChatConfig:
    answer_all_in_groups: bool = False
    rate_limit_messages: int = 8
    rate_limit_seconds: float = 60.0
    max_message_chars: int = 4000


@dataclass
class AdminsConfig:
    telegram: list = field(default_factory=list)
    discord: list = field(default_factory=list)


@dataclass
class TelegramConfig:
    base_url: str = ""
    mode: str = "polling"
    webhook_url: str = ""
    webhook_listen: str = "0.0.0.0"
    webhook_port: int = 8443
    answer_all_chat_types: list = field(default_factory=list)   # "group", "supergroup"


@dataclass
class DiscordConfig:
    command_guilds: list = field(default_factory=list)
    answer_all_channels: list = field(default_factory=list)


@dataclass
class LearningConfig:
    enabled: bool = False
    schedule: str = "24h"
    min_new_messages: int = 200
    promote_margin: float = 0.01
    base_loss_tolerance: float = 0.05
    registry: str = "models"
    # what a run trains on
    held_out_fraction: float = 0.2       # newest slice of the new dialogues, never trained on
    replay_fraction: float = 0.5         # older logged dialogues mixed in, per new training dialogue
    base_corpus: str = "chitchat"        # replayed and used for the forgetting check ("" = none)
    base_replay_fraction: float = 0.5    # base-corpus dialogues mixed in, per new training dialogue
    base_eval_dialogues: int = 100       # the fixed base-corpus sample both models are scored on
    # how a run trains
    lr: float = 1e-4
    epochs: float = 2.0
    batch_size: int = 8
    max_len: int = 256
    max_minutes: float = 10.0            # training time budget (evaluation comes on top)
    # keeping the bot responsive while it trains
    threads: int = 1
    nice: int = 10
    pause_trainer_while_chatting: bool = True   # the trainer is stopped while the engine answers (bots/learning/quiet.py)
    max_memory_mb: int = 4096            # 0 = no limit
    min_free_disk_mb: int = 500
    # housekeeping
    keep_versions: int = 0               # fine-tuned versions kept on disk (0 = all)
    poll_seconds: float = 5.0            # how often a running bot looks for `mynah rollback`
    misfire_grace_seconds: int = 3600
    notify: list = field(default_factory=list)   # "telegram:12345": also told about scheduled runs


@dataclass
class DashboardConfig:
    enabled: bool = False                # needs MYNAH_DASHBOARD_TOKEN in the environment
    listen: str = "127.0.0.1"            # keep it on loopback unless a TLS proxy fronts it
    port: int = 8080                     # 0 = any free port
    show_messages: bool = False          # show message text on the Chats page


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    admins: AdminsConfig = field(default_factory=AdminsConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    source: Path | None = None


_CHOICES = {
    ("model", "format"): {"auto", "dialogpt", "chitchat", "chat_template"},
    ("model", "device"): {"auto", "cpu", "cuda", "mps"},
    ("telegram", "mode"): {"polling", "webhook"},
    ("engine", "quantize"): {"none", "int8"},
    ("engine", "fast_path"): {"auto", "off"},
    ("engine", "backend"): {"local", "ctranslate2"},
}
_POSITIVE = {
    ("generation", "max_new_tokens"), ("generation", "max_history_turns"),
    ("generation", "max_context_tokens"), ("engine", "max_batch_size"),
    ("engine", "max_queue"), ("chat", "rate_limit_messages"),
    ("chat", "rate_limit_seconds"), ("chat", "max_message_chars"),
    ("generation", "mmi_candidates"),
}


def _check_value(section: str, key: str, value: Any, hint: Any) -> Any:
    where = f"[{section}] {key}"
    hint_text = str(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif hint is int or hint_text == "int | None":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
    elif hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
    if (section, key) in _CHOICES and value not in _CHOICES[(section, key)]:
        allowed = ", ".join(sorted(_CHOICES[(section, key)]))
        raise ConfigError(f"{where} must be one of {allowed}; got {value!r}")
    if (section, key) in _POSITIVE and value <= 0:
        raise ConfigError(f"{where} must be greater than 0, got {value!r}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: _check_value(name, k, v, hints[k]) for k, v in raw.items()}
    section = cls(**values)
    _check_section(name, section)
    return section


def _check_section(name: str, section: Any) -> None:
    if name == "generation":
        if not 0 < section.temperature <= 10:
            raise ConfigError(f"[generation] temperature must be in (0, 10], got {section.temperature}")
        if not 0 < section.top_p <= 1:
            raise ConfigError(f"[generation] top_p must be in (0, 1], got {section.top_p}")
        if section.top_k < 0:
            raise ConfigError(f"[generation] top_k must be 0 (off) or more, got {section.top_k}")
        if section.repetition_penalty < 1:
            raise ConfigError("[generation] repetition_penalty must be 1.0 (off) or more")
        if section.min_new_tokens > section.max_new_tokens:
            raise ConfigError("[generation] min_new_tokens must not exceed max_new_tokens")
        if not 0.0 <= section.mmi_weight <= 1.0:
            raise ConfigError(f"[generation] mmi_weight must be in [0, 1], got {section.mmi_weight}")
    if name == "engine":
        for key in ("threads", "threads_while_training"):
            if getattr(section, key) < 0:
                raise ConfigError(f"[engine] {key} must be 0 (torch's default / leave as is) or more, "
                                  f"got {getattr(section, key)}")
    if name == "telegram":
        bad = [t for t in section.answer_all_chat_types if t not in ("group", "supergroup")]
        if bad:
            raise ConfigError(f"[telegram] answer_all_chat_types may hold \"group\" and \"supergroup\"; got {bad!r}")
    if name == "dashboard":
        if not 0 <= section.port <= 65535:
            raise ConfigError(f"[dashboard] port must be between 1 and 65535 (0 = any free port), got {section.port}")
        if not section.listen.strip():
            raise ConfigError("[dashboard] listen must be an address, e.g. \"127.0.0.1\"")
    if name == "learning":
        from bots.learning.schedule import parse_schedule  # local: avoids a cycle at import time

        try:
            parse_schedule(section.schedule)
        except ValueError as exc:
            raise ConfigError(f"[learning] schedule: {exc}") from None
        _check_learning(section)


def _check_learning(section: Any) -> None:
    def bad(key: str, rule: str) -> ConfigError:
        return ConfigError(f"[learning] {key} must be {rule}, got {getattr(section, key)!r}")

    if not 0 < section.held_out_fraction < 1:
        raise bad("held_out_fraction", "between 0 and 1")
    for key in ("replay_fraction", "base_replay_fraction", "promote_margin", "base_loss_tolerance"):
        if getattr(section, key) < 0:
            raise bad(key, "0 or more")
    for key in ("lr", "epochs", "batch_size", "max_len", "poll_seconds", "misfire_grace_seconds"):
        if getattr(section, key) <= 0:
            raise bad(key, "greater than 0")
    for key in ("min_new_messages", "base_eval_dialogues", "max_minutes", "threads", "max_memory_mb",
                "min_free_disk_mb", "keep_versions"):
        if getattr(section, key) < 0:
            raise bad(key, "0 or more")
    if not 0 <= section.nice <= 19:
        raise bad("nice", "between 0 and 19")
    if not section.registry.strip():
        raise bad("registry", "a folder")
    for target in section.notify:
        platform, _, chat = str(target).partition(":")
        if not platform or not chat:
            raise ConfigError(f"[learning] notify entries look like \"telegram:CHAT_ID\", got {target!r}")


def parse_config(raw: dict, source: Path | None = None) -> Config:
    """Turn a parsed TOML document into a checked Config."""
    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "source"}
    hints = get_type_hints(Config)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(sorted(sections))}")
    built = {name: _build_section(name, hints[name], raw.get(name, {})) for name in sections}
    return Config(**built, source=source)


def load_config(path: str | Path | None) -> Config:
    """Read a config file; a missing default file means all defaults."""
    if path is None:
        path = Path("config.toml")
        if not path.exists():
            return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw, source=path)
