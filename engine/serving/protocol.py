"""The contract between the bot and whatever writes its replies.

The bot (bots/) talks to an engine only through `ReplyEngine`: start it, ask for a reply to
a chat's turns, read its stats, stop it. The local batching engine (batcher.Engine) and
the MMI reranker around it (mmi.MMIEngine) implement it explicitly; a remote backend (an
OpenAI-compatible HTTP server) can implement it too, because nothing here needs torch.

`ModelEngine` adds what only an engine that holds a model in this process has: the
`LoadedModel` it serves, hot-swapping it (`swap`, the learning loop's promote/rollback)
and the context limit MMI scores with. The learning loop and MMI need a ModelEngine; the
chat path, /status and the front ends need only a ReplyEngine.

The values that cross the boundary live here too: `SamplingParams` (per-request
`overrides` are its field names), `Reply`, `EngineStats`, and the two refusals.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from engine.types import Turn

if TYPE_CHECKING:
    from engine.model import LoadedModel

FALLBACK_REPLY = "Hmm, I'm not sure what to say to that."  # said when the model produced nothing usable


@dataclass
class SamplingParams:
    """How the next turn is drawn. The engine's defaults; a request may override any field."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    max_new_tokens: int = 40
    min_new_tokens: int = 1
    do_sample: bool = True
    seed: int | None = None
    banned_words: list[str] = field(default_factory=list)

    def merged(self, overrides: dict | None) -> "SamplingParams":
        """A copy with per-request overrides; unknown names are an error, not ignored."""
        if not overrides:
            return dataclasses.replace(self)
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)


@dataclass
class Reply:
    """The bot's next turn, and the model version that wrote it (logged with the message)."""

    text: str
    model_version: str
    new_tokens: int
    latency_s: float
    fallback: bool = False  # the model produced nothing usable; `text` is the configured fallback


@dataclass(frozen=True)
class MMIStats:
    """What MMI reranking has done since start (see engine/serving/mmi.py)."""

    candidates: int                  # N replies sampled per answer
    weight: float                    # the backward model's share of the combined score
    backward_model: str              # the backward model's version
    candidates_generated: int        # replies the wrapped engine wrote (N per reranked answer)
    scoring_p50_s: float | None      # median time of one scoring pass
    changed_by_backward: int         # answers where the backward model overruled the forward favourite


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /status and the benchmarks; latencies are None until a reply is served."""

    model_version: str
    queue_depth: int                 # requests waiting for a slot in the batch
    active: int                      # requests being decoded now
    replies: int                     # answers served since start
    latency_p50_s: float | None      # reply latency (queueing included) over the last 1000 answers
    latency_p95_s: float | None
    uptime_s: float
    mmi: MMIStats | None = None      # None: no MMI reranking


class EngineBusy(RuntimeError):
    """The queue is full: the caller should say "busy, try again" instead of waiting."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@runtime_checkable
class ReplyEngine(Protocol):
    """What the bot uses of an engine. `async with engine:` starts and stops it."""

    defaults: SamplingParams  # what a request gets for every setting it does not override

    @property
    def version(self) -> str:
        """The version of the model answering now (a reply names its own in Reply.model_version)."""
        ...

    def start(self) -> None:
        """Begin serving; calling it again does nothing."""
        ...

    async def stop(self) -> None:
        """Finish the requests in flight, then stop; later reply() calls raise EngineStopped."""
        ...

    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None) -> Reply:
        """The bot's next turn for a chat whose history (oldest first) is `turns`.

        `overrides` names SamplingParams fields for this request only (ValueError for an
        unknown name). Raises EngineBusy when the queue is full, EngineStopped when stopped.
        """
        ...

    def stats(self) -> EngineStats:
        ...

    async def __aenter__(self) -> "ReplyEngine":
        ...

    async def __aexit__(self, *exc) -> None:
        ...


@runtime_checkable
class ModelEngine(ReplyEngine, Protocol):
    """A ReplyEngine that serves a model loaded in this process (local-engine-only members)."""

    max_context_tokens: int  # prompt budget in tokens (MMI scores the same context the engine saw)
    max_batch_size: int      # requests decoded together at most (the metrics report it)

    @property
    def model(self) -> LoadedModel:
        """The model serving now (torch module, tokenizer, dialogue format)."""
        ...

    def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` from the next batch on; requests in flight finish on the old model."""
        ...


@runtime_checkable
class RemoteModelSwitch(Protocol):
    """A ReplyEngine whose model lives in another server (an OpenAI-compatible backend such as
    vLLM). The learning loop cannot swap weights there; it loads a LoRA adapter into the server
    (engine/serving/lora_admin.py) and then switches which served model requests name."""

    base_url: str   # the OpenAI-compatible base URL, e.g. "http://gpu-box:8000/v1"

    @property
    def served_model(self) -> str | None:
        """The `model` requests name now (None: the backend's own base model)."""
        ...

    def set_served_model(self, model: str | None, version: str) -> None:
        """From the next request on, ask for `model` (None: the backend's base model) and record
        `version` as the model version of the replies (in-flight requests are not affected)."""
        ...
