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

import asyncio
import concurrent.futures
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Protocol, Sequence, runtime_checkable

from engine.types import Turn

Route = int | str | None   # which conversation a request is for (ReplyEngine.reply's `route`)

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
    # a reply cut by max_new_tokens ends at its last sentence end, a rambling one stops at one
    # (engine/serving/sentences.py); off: the tokens exactly as drawn
    finish_sentences: bool = True

    @classmethod
    def from_settings(cls, g) -> "SamplingParams":
        """From a [generation] section (any object with these attribute names)."""
        return cls(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, repetition_penalty=g.repetition_penalty,
                   max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens, seed=g.seed,
                   banned_words=list(g.banned_words), finish_sentences=g.finish_sentences)

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
    backend: str = "local"           # "local" (this process) or "openai <base_url>" (a remote server)
    healthy: bool = True             # False while a remote backend's circuit breaker is open
    health: str = "ok"               # a few words on the backend's state, for /status
    backend_latency_s: float | None = None  # the last successful request's round trip to a remote backend


class EngineBusy(RuntimeError):
    """The queue is full: the caller should say "busy, try again" instead of waiting."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class EngineUnavailable(RuntimeError):
    """A remote backend is unreachable or failing (after its retries, or its circuit breaker
    is open): the caller should apologise briefly; the bot keeps running and recovers."""


class ReplyStream:
    """A reply as it is written: `async for delta in stream` yields pieces of text (deltas,
    in order; joined they are the reply so far), then `stream.reply` is the finished Reply.

    `produce(stream)` does the work: it calls `stream.push(delta)` as text arrives (from
    the event loop) and returns the finished Reply. It runs as a task once the stream is
    iterated and is cancelled if the consumer stops early; its exception is raised to the
    consumer. The Reply's text can differ from the joined deltas (the fallback reply, or
    the one whole delta of an engine that cannot stream): the Reply is what is logged."""

    def __init__(self, produce: "Callable[[ReplyStream], Awaitable[Reply]]"):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._produce = produce
        self._task: asyncio.Task | None = None
        self.reply: Reply | None = None
        self.text = ""  # the deltas so far, joined

    def push(self, delta: str) -> None:
        if delta:
            self._queue.put_nowait(("delta", delta))

    async def _run(self) -> None:
        try:
            self._queue.put_nowait(("done", await self._produce(self)))
        except Exception as exc:
            self._queue.put_nowait(("error", exc))

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        if self._task is not None:
            raise RuntimeError("a ReplyStream can be read once")
        self._task = asyncio.ensure_future(self._run())
        try:
            while True:
                kind, value = await self._queue.get()
                if kind == "delta":
                    self.text += value
                    yield value
                elif kind == "done":
                    self.reply = value
                    return
                else:
                    raise value
        finally:
            if not self._task.done():
                self._task.cancel()

    async def result(self) -> Reply:
        """Drain the stream; the finished Reply."""
        async for _ in self:
            pass
        return self.reply


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

    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
                    route: Route = None) -> Reply:
        """The bot's next turn for a chat whose history (oldest first) is `turns`.

        `overrides` names SamplingParams fields for this request only (ValueError for an
        unknown name). `system` is the chat's persona: the system message of chat-template
        models; formats without a system role (dialogpt, chitchat) ignore it. `route` names
        the conversation (the chats.id) for an engine that serves chats from different
        models (the canary's Router, as vLLM takes a `lora_request`); others ignore it. Raises
        EngineBusy when the queue is full, EngineStopped when stopped, EngineUnavailable
        when a remote backend cannot answer.
        """
        ...

    def stream(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
               route: Route = None) -> ReplyStream:
        """Like reply(), but the text arrives as it is written (see ReplyStream). Errors are
        raised while iterating. An engine that cannot stream yields the whole reply once."""
        ...

    def stats(self) -> EngineStats:
        ...

    # `async with`: the one definition for every engine that names ReplyEngine as its base
    async def __aenter__(self) -> "ReplyEngine":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


@runtime_checkable
class ModelEngine(ReplyEngine, Protocol):
    """A ReplyEngine that serves a model loaded in this process (local-engine-only members)."""

    max_context_tokens: int  # prompt budget in tokens (MMI scores the same context the engine saw)
    max_batch_size: int      # requests decoded together at most (the metrics report it)

    @property
    def model(self) -> LoadedModel:
        """The model serving now (torch module, tokenizer, dialogue format)."""
        ...

    def swap(self, loaded: LoadedModel) -> "concurrent.futures.Future":
        """Serve `loaded` from the next batch on; requests in flight finish on the old model.
        The future resolves (to the version) once the new model serves."""
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


class EngineWrapper:
    """A ReplyEngine in front of another one (`inner`: MMI reranking, the canary's Router): its
    lifecycle, version, defaults and stats are the inner engine's unless the wrapper says otherwise."""

    @property
    def inner(self):
        raise NotImplementedError

    @property
    def version(self) -> str:
        return self.inner.version

    @property
    def defaults(self) -> SamplingParams:
        return self.inner.defaults

    def stats(self) -> EngineStats:
        return self.inner.stats()

    def start(self) -> None:
        self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def __aenter__(self):
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
