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
    finish_sentences: bool = SamplingParams.finish_sentences
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
    # where replies come from: "local" (this process), "openai" (an OpenAI-compatible server;
    # docs/SCALING.md) or "ctranslate2" (CTranslate2 on a converted copy; pip install mynah[bench])
    backend: str = "local"
    base_url: str = ""                   # "openai": e.g. "http://gpu-box:8000/v1"; the key is MYNAH_ENGINE_API_KEY
    model: str = ""                      # "openai": the served model name (vllm serve's --served-model-name)
    api: str = "auto"                    # "openai": "chat", "completions", or "auto" (by [model] path's tokenizer)
    timeout_seconds: float = 60.0        # "openai": one request, streaming included
    max_reply_chars: int = 4096          # "openai": a longer reply (a server ignoring max_tokens) is cut here
    retries: int = 2                     # "openai": retries of a failed request (connection, timeout, 429, 5xx)
    retry_backoff_seconds: float = 0.5   # first wait between retries; doubles each time
    breaker_failures: int = 5            # failures in a row that open the circuit breaker
    breaker_cooldown_seconds: float = 30.0  # how long it stays open before one probe is let through
    extra_sampling: bool = True          # send top_k, repetition_penalty, min_tokens (vLLM, llama.cpp read them)
    fast_path: str = "auto"              # "auto": GPT-2-family models decode on the hand-written step; "off"
    pack_weights: bool = True            # fp32 on CPU: layers packed for oneDNN where that is faster (not on Intel)
    threads_while_training: int = 0      # torch threads while a trainer child runs (0 = leave as is)
    prefill_threads: int = 0             # a prefill's threads: 0 = `threads` plus the cores other processes leave idle


@dataclass
class StorageConfig:
    path: str = "data/mynah.sqlite3"
    url: str = ""                        # "postgresql://USER@HOST:PORT/DB": PostgreSQL instead of `path`
    heartbeat_seconds: float = 5.0       # PostgreSQL: how often a worker says it is alive
    worker_timeout_seconds: float = 20.0  # …and after how long a silent worker counts as dead
    busy_timeout_ms: int = 5000          # how long one write waits for another process's lock
    write_retry_first_s: float = 0.5     # then a message's write is retried after this, doubling…
    write_retry_max_s: float = 30.0      # …up to this, for as long as storage stays locked or full


@dataclass
class ChatConfig:
    answer_all_in_groups: bool = False
    rate_limit_messages: int = 8
    rate_limit_seconds: float = 60.0
    max_message_chars: int = 4000
    stream: bool = True                  # show replies while they are written (edits the sent message)
    stream_edit_seconds: float = 1.0     # at most one edit per this many seconds per reply (flood limits)
    default_persona: str = ""            # system prompt of chats without their own /persona (config.toml ships one)
    resend_pending_minutes: float = 10.0   # at start-up: replies left pending are resent when younger


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
    shards: str | int = 1                # 1: one connection; "auto": Discord's recommended count; N: N shards
    shard_ids: list = field(default_factory=list)   # this process's shards of `shards` (several workers); [] = all
    catch_up_minutes: float = 10.0       # on (re)connect: answer what was missed this recently (0 = off)


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
    # at scale: LoRA adapters and the trainer's hardware (docs/LEARNING.md, docs/SCALING.md)
    method: str = "auto"                 # "full" fine-tune, "lora" adapters (peft), "auto": LoRA for chat models
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list = field(default_factory=list)   # empty = detected from the architecture
    base_model: str = ""                 # local copy of the model a remote backend serves (LoRA trains on it)
    adapter_path_prefix: str = ""        # the registry folder as the backend machine sees it ("" = same path)
    devices: str = "auto"                # "auto" (every GPU, else CPU), "cpu", "cuda" (one GPU) or a GPU count
    # trust: no single user can teach the model, and /forget reaches it
    max_user_share: float = 0.2          # no user supplies more than this share of a run's new messages
    min_users: int = 5                   # distinct contributors a run's new training data needs (after the cap)
    min_account_age_hours: float = 24.0  # accounts first seen more recently neither train, evaluate nor vote
    require_approval: bool = False       # a passing candidate waits for an admin's /promote
    parrot_ratio: float = 3.0            # reject when a user's long n-grams show up this many times more
    parrot_ngram: int = 4                # words per n-gram the parrot check looks for
    probe_prompts: list = field(default_factory=list)   # [] = the built-in list (bots/learning/probes.py)
    rebuild_delay_seconds: float = 300.0   # forgets within this window share one rebuild run
    # feedback in training and canary rollout (docs/LEARNING.md, "Feedback and canary rollout")
    feedback_weighting: str = "drop"     # off | drop (negative replies left out) | weight (+ positive ones twice)
    canary_share: float = 0.0            # share of chats a passing candidate serves first (0 = promote at once)
    canary_hours: float = 24.0           # the canary's longest run before it is judged
    canary_min_replies: int = 200        # rated replies each side needs before the test may promote
    canary_margin: float = 0.05          # non-inferiority margin on the positive rate
    canary_alpha: float = 0.05           # one-sided significance level of that test
    canary_min_raters: int = 30          # distinct established raters each side needs before it may promote


@dataclass
class FeedbackConfig:
    enabled: bool = True                 # store reactions and derive implicit signals
    positive: list = field(default_factory=lambda: ["👍", "❤", "🔥", "🥰", "👏", "😁", "🤣", "😂", "💯", "🙏", "⭐",
                                                    "🎉", "😍", "🤩", "👌", "❤‍🔥", "🏆", "😊", "💘", "🤗"])
    negative: list = field(default_factory=lambda: ["👎", "💩", "🤮", "😡", "🤬", "🤡", "🥱", "😴", "🤨", "😐",
                                                    "💔", "🙄"])
    buttons: bool = False                # 👍/👎 buttons under each reply (Telegram)
    implicit_window_minutes: float = 5.0  # a next message within this counts as going on talking
    short_negatives: list = field(default_factory=list)  # extra answers that mean "that made no sense"


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
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    source: Path | None = None

    def serves_lean(self) -> bool:
        """Whether the served model may load without transformers (engine.lean): the local engine on its
        fast path, and no MMI (its reranker runs the model's own forward)."""
        return self.engine.backend == "local" and self.engine.fast_path == "auto" and not self.generation.mmi_model


_CHOICES = {
    ("model", "format"): {"auto", "dialogpt", "chitchat", "chat_template"},
    ("model", "device"): {"auto", "cpu", "cuda", "mps"},
    ("telegram", "mode"): {"polling", "webhook"},
    ("engine", "quantize"): {"none", "int8"},
    ("engine", "backend"): {"local", "openai", "ctranslate2"},
    ("engine", "api"): {"auto", "chat", "completions"},
    ("learning", "feedback_weighting"): {"off", "drop", "weight"},
    ("engine", "fast_path"): {"auto", "off"},
}
_POSITIVE = {
    ("generation", "max_new_tokens"), ("generation", "max_history_turns"),
    ("generation", "max_context_tokens"), ("engine", "max_batch_size"),
    ("engine", "max_queue"), ("chat", "rate_limit_messages"),
    ("chat", "rate_limit_seconds"), ("chat", "max_message_chars"),
    ("generation", "mmi_candidates"), ("engine", "timeout_seconds"), ("engine", "breaker_failures"),
    ("engine", "max_reply_chars"),
    ("chat", "stream_edit_seconds"), ("storage", "busy_timeout_ms"), ("storage", "write_retry_first_s"),
    ("storage", "write_retry_max_s"), ("storage", "heartbeat_seconds"), ("storage", "worker_timeout_seconds"),
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


def _check_storage_url(url: str) -> None:
    """A PostgreSQL URL without a password: that comes from MYNAH_DATABASE_PASSWORD or libpq's
    pgpass / service file, so config.toml (often in git, often world-readable) never holds it."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError as exc:
        raise ConfigError(f"[storage] url is not a valid URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError('[storage] url must start with "postgresql://" (SQLite uses [storage] path)')
    if parts.password is not None:
        raise ConfigError("[storage] url must not contain a password: set MYNAH_DATABASE_PASSWORD in the "
                          "environment or use a pgpass / service file")
    if "password" in parts.query.lower():
        raise ConfigError("[storage] url must not contain a password parameter: set MYNAH_DATABASE_PASSWORD")


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
        for key in ("threads", "threads_while_training", "prefill_threads"):
            if getattr(section, key) < 0:
                raise ConfigError(f"[engine] {key} must be 0 (automatic / leave as is) or more, "
                                  f"got {getattr(section, key)}")
    if name == "telegram":
        bad = [t for t in section.answer_all_chat_types if t not in ("group", "supergroup")]
        if bad:
            raise ConfigError(f"[telegram] answer_all_chat_types may hold \"group\" and \"supergroup\"; got {bad!r}")
    if name == "engine":
        _check_engine(section)
    if name == "discord":
        shards = section.shards
        if not (shards == "auto" or (isinstance(shards, int) and not isinstance(shards, bool) and shards >= 1)):
            raise ConfigError(f'[discord] shards must be "auto" or a whole number of 1 or more, got {shards!r}')
        ids = section.shard_ids
        if ids and (shards == "auto" or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < shards
                                                for i in ids) or len(set(ids)) != len(ids)):
            raise ConfigError(f"[discord] shard_ids must be distinct shard numbers from 0 to shards - 1 with a fixed "
                              f"shards count (each worker its own), got {ids!r} with shards = {shards!r}")
    if name == "chat" and section.resend_pending_minutes < 0:
        raise ConfigError(f"[chat] resend_pending_minutes must be 0 (never resend) or more, "
                          f"got {section.resend_pending_minutes}")
    if name == "discord" and section.catch_up_minutes < 0:
        raise ConfigError(f"[discord] catch_up_minutes must be 0 (off) or more, got {section.catch_up_minutes}")
    if name == "storage" and section.write_retry_max_s < section.write_retry_first_s:
        raise ConfigError("[storage] write_retry_max_s must be at least write_retry_first_s")
    if name == "storage" and section.url:
        _check_storage_url(section.url)
    if name == "storage" and section.worker_timeout_seconds < 2 * section.heartbeat_seconds:
        raise ConfigError("[storage] worker_timeout_seconds must be at least twice heartbeat_seconds")
    if name == "dashboard":
        if not 0 <= section.port <= 65535:
            raise ConfigError(f"[dashboard] port must be between 1 and 65535 (0 = any free port), got {section.port}")
        if not section.listen.strip():
            raise ConfigError("[dashboard] listen must be an address, e.g. \"127.0.0.1\"")
    if name == "feedback":
        _check_feedback(section)
    if name == "learning":
        from bots.learning.schedule import parse_schedule  # local: avoids a cycle at import time

        try:
            parse_schedule(section.schedule)
        except ValueError as exc:
            raise ConfigError(f"[learning] schedule: {exc}") from None
        _check_learning(section)


def _check_engine(section: Any) -> None:
    if section.retries < 0 or section.retry_backoff_seconds < 0 or section.breaker_cooldown_seconds < 0:
        raise ConfigError("[engine] retries, retry_backoff_seconds and breaker_cooldown_seconds must be 0 or more")
    if section.backend == "openai":
        if not section.base_url.startswith(("http://", "https://")):
            shown = "…@" + section.base_url.rsplit("@", 1)[1] if "@" in section.base_url else section.base_url
            raise ConfigError('[engine] backend = "openai" needs base_url, the server\'s API root, '
                              f'e.g. "http://gpu-box:8000/v1"; got {shown!r}')   # never a password
        if not section.model.strip():
            raise ConfigError('[engine] backend = "openai" needs model, the served model name '
                              "(what GET /v1/models lists)")


def _check_learning(section: Any) -> None:
    def bad(key: str, rule: str) -> ConfigError:
        return ConfigError(f"[learning] {key} must be {rule}, got {getattr(section, key)!r}")

    if not 0 < section.held_out_fraction < 1:
        raise bad("held_out_fraction", "between 0 and 1")
    if not 0 < section.max_user_share <= 1:
        raise bad("max_user_share", "more than 0 and at most 1")
    if section.min_users < 1:
        raise bad("min_users", "1 or more")
    if not 0 <= section.min_account_age_hours <= 24 * 365:
        raise bad("min_account_age_hours", "between 0 (off) and 8760 (a year)")
    if section.canary_min_raters < 1:
        raise bad("canary_min_raters", "1 or more")
    if section.parrot_ratio <= 1 or section.parrot_ngram < 2:
        raise ConfigError("[learning] parrot_ratio must be more than 1 and parrot_ngram 2 or more")
    if section.rebuild_delay_seconds < 0:
        raise bad("rebuild_delay_seconds", "0 or more")
    if not all(isinstance(p, str) and p.strip() for p in section.probe_prompts):
        raise bad("probe_prompts", "a list of non-empty strings")
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
    _check_lora(section, bad)
    if not section.registry.strip():
        raise bad("registry", "a folder")
    if not 0 <= section.canary_share < 1:
        raise bad("canary_share", "0 (off) or more, and below 1")
    for key in ("canary_hours", "canary_min_replies", "canary_alpha"):
        if getattr(section, key) <= 0:
            raise bad(key, "greater than 0")
    if not 0 <= section.canary_margin < 1 or section.canary_alpha >= 0.5:
        raise bad("canary_margin" if section.canary_alpha < 0.5 else "canary_alpha", "between 0 and 1 (alpha below 0.5)")
    for target in section.notify:
        platform, _, chat = str(target).partition(":")
        if not platform or not chat:
            raise ConfigError(f"[learning] notify entries look like \"telegram:CHAT_ID\", got {target!r}")


def _check_lora(section: Any, bad) -> None:
    """[learning] method, the LoRA knobs and devices."""
    if section.method not in ("full", "lora", "auto"):
        raise bad("method", '"full", "lora" or "auto" (LoRA for chat-template models, else full)')
    if section.lora_r <= 0:
        raise bad("lora_r", "greater than 0")
    if section.lora_alpha <= 0:
        raise bad("lora_alpha", "greater than 0")
    if not 0 <= section.lora_dropout < 1:
        raise bad("lora_dropout", "in [0, 1)")
    if not all(isinstance(m, str) and m.strip() for m in section.lora_target_modules):
        raise bad("lora_target_modules", 'a list of module names, e.g. ["q_proj", "v_proj"]')
    if section.method == "lora":
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise ConfigError("[learning] method = \"lora\" needs the peft package: pip install 'mynah[lora]'")
    devices = section.devices.strip().lower()
    if devices not in ("auto", "cpu", "cuda") and not (devices.isdigit() and int(devices) > 0):
        raise bad("devices", '"auto", "cpu", "cuda" or a number of GPUs such as "2"')
    section.devices = devices
def _check_feedback(section: Any) -> None:
    if section.implicit_window_minutes <= 0:
        raise ConfigError("[feedback] implicit_window_minutes must be greater than 0, "
                          f"got {section.implicit_window_minutes!r}")
    for key in ("positive", "negative", "short_negatives"):
        bad = [e for e in getattr(section, key) if not isinstance(e, str) or not e.strip()]
        if bad:
            raise ConfigError(f"[feedback] {key} must list non-empty strings, got {bad!r}")
    both = {e.replace("\ufe0f", "") for e in section.positive} & {e.replace("\ufe0f", "") for e in section.negative}
    if both:
        raise ConfigError(f"[feedback] these emoji are both positive and negative: {' '.join(sorted(both))}")


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
