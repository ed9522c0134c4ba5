"""The generation engine: one worker thread owns the model and serves every chat.

Requests from all chats go into one bounded queue. The worker runs continuous batching:
at each decode step, waiting requests are prefilled and merged into the running batch
(left padding, attention mask, KV cache), every row gets one token with its own
sampling settings, and finished rows leave at once. So a short reply never waits for a
long one and a new chat never waits for a whole batch. Torch runs in this thread, never
in the event loop. A model swap happens between batches: rows in flight finish on the
model they started with, and each reply names the version that wrote it.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine import kvcache
from engine.model import LoadedModel
from engine.sampling import RowSampler, SamplingParams, next_tokens

log = logging.getLogger(__name__)

Turn = tuple[str, str]


class EngineBusy(RuntimeError):
    """The queue is full: the caller should say "busy, try again" instead of waiting."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class Reply:
    text: str
    model_version: str
    new_tokens: int
    latency_s: float
    fallback: bool = False


@dataclass
class _Request:
    context_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float
    attempt: int = 0
    generated: list[int] = field(default_factory=list)
    sampler: RowSampler | None = None
    version: str = ""

    def finish(self, result) -> None:
        def _set():
            if not self.future.done():
                if isinstance(result, BaseException):
                    self.future.set_exception(result)
                else:
                    self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


def _forward_kwargs(model) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x called it `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """Async front (`reply`) over a batching worker thread (`_run`)."""

    def __init__(
        self,
        loaded: LoadedModel,
        defaults: SamplingParams | None = None,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_context_tokens: int = 256,
        fallback_reply: str = "Hmm, I'm not sure what to say to that.",
        threads: int = 0,
    ):
        self.defaults = defaults or SamplingParams()
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_context_tokens = max_context_tokens
        self.fallback_reply = fallback_reply
        self.threads = threads
        self._loaded = loaded
        self._pending_swap: LoadedModel | None = None
        self._prepare(loaded)
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self.replies_served = 0
        self.started_at = time.time()

    # ---- public, event-loop side -------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        return self._loaded

    @property
    def version(self) -> str:
        return self._loaded.version

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._thread = threading.Thread(target=self._run, name="mynah-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish what is in flight, then stop the worker."""
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def __aenter__(self) -> "Engine":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None) -> Reply:
        """The bot's next turn for a chat whose history (oldest first) is `turns`."""
        params = self.defaults.merged(overrides)
        loop = asyncio.get_running_loop()
        request = _Request(context_ids=[], params=params, loop=loop, future=loop.create_future(), enqueued_at=time.monotonic())
        request.context_ids = self._context_ids(self._loaded, turns, params)
        with self._wake:
            if not self._running:
                raise EngineStopped("the engine is not running")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"{len(self._queue)} requests are already waiting")
            self._queue.append(request)
            self._wake.notify()
        return await request.future

    def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` from the next batch on; rows in flight finish on the old model."""
        with self._wake:
            self._pending_swap = loaded
            self._wake.notify()

    def stats(self) -> dict:
        lat = sorted(self._latencies)
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
        return {
            "model_version": self.version,
            "queue_depth": len(self._queue),
            "active": getattr(self, "_active_count", 0),
            "replies": self.replies_served,
            "latency_p50_s": pick(0.5),
            "latency_p95_s": pick(0.95),
            "uptime_s": time.time() - self.started_at,
        }

    # ---- helpers ----------------------------------------------------------------
    def _prepare(self, loaded: LoadedModel) -> None:
        """Per-model facts the worker needs: cache kwarg, banned ids, context limit."""
        loaded.cache_kwarg = _forward_kwargs(loaded.model)
        positions = getattr(loaded.model.config, "n_positions", None) or getattr(loaded.model.config, "max_position_embeddings", 1024)
        loaded.max_positions = positions
        loaded.banned_word_ids = {}

    def _context_ids(self, loaded: LoadedModel, turns: Sequence[Turn], params: SamplingParams) -> list[int]:
        budget = min(self.max_context_tokens, loaded.max_positions - params.max_new_tokens)
        if budget < 8:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for context in a {loaded.max_positions}-position model")
        return loaded.fmt.context_ids(list(turns), budget)

    def _banned_ids(self, loaded: LoadedModel, params: SamplingParams) -> set[int]:
        """[UNK] & co. plus banned words that are a single token (with or without a leading space)."""
        banned = set(loaded.fmt.banned_ids)
        for word in params.banned_words:
            if word not in loaded.banned_word_ids:
                ids = set()
                for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
                    encoded = loaded.fmt.encode_text(variant)
                    if len(encoded) == 1:
                        ids.add(encoded[0])
                loaded.banned_word_ids[word] = ids
            banned |= loaded.banned_word_ids[word]
        return banned

    # ---- worker thread ----------------------------------------------------------
    def _run(self) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        rows: list[_Request] = []
        state = None  # (cache, mask, positions, next_input) for `rows`
        with torch.inference_mode():
            while True:
                with self._wake:
                    if not rows and self._pending_swap is not None:
                        self._loaded, self._pending_swap = self._pending_swap, None
                        self._prepare(self._loaded)
                        log.info("now serving model version %s", self._loaded.version)
                    admitted = []
                    if self._pending_swap is None:
                        while self._queue and len(rows) + len(admitted) < self.max_batch_size:
                            admitted.append(self._queue.popleft())
                    if not rows and not admitted:
                        if not self._running and not self._queue:
                            return
                        self._wake.wait(timeout=0.5)
                        continue
                try:
                    rows, state = self._step(rows, state, admitted)
                except Exception as exc:  # a broken model must not take the bot down
                    log.exception("generation failed")
                    for request in rows + admitted:
                        request.finish(RuntimeError(f"generation failed: {exc}"))
                    rows, state = [], None
                self._active_count = len(rows)

    def _step(self, rows: list[_Request], state, admitted: list[_Request]):
        loaded = self._loaded
        if admitted:
            new_rows, new_state = self._prefill(loaded, admitted)
            if new_rows:
                if rows:
                    state = self._merge(state, new_state)
                    rows = rows + new_rows
                else:
                    rows, state = new_rows, new_state
        if not rows:
            return [], None
        cache, mask, positions, next_input = state
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        out = loaded.model(
            input_ids=next_input[:, None], attention_mask=mask, position_ids=positions[:, None],
            use_cache=True, **{loaded.cache_kwarg: cache},
        )
        cache = getattr(out, loaded.cache_kwarg, None) or out.past_key_values
        tokens = next_tokens(out.logits[:, -1, :], [r.sampler for r in rows], [len(r.generated) for r in rows], loaded.fmt.stop_ids)
        state = (cache, mask, positions + 1, torch.tensor(tokens, device=loaded.device))
        return self._retire(rows, state, tokens)

    def _prefill(self, loaded: LoadedModel, admitted: list[_Request]):
        for request in admitted:
            request.version = loaded.version
            request.sampler = RowSampler(request.params, request.context_ids, self._banned_ids(loaded, request.params))
        width = max(len(r.context_ids) for r in admitted)
        pad = loaded.fmt.pad_id
        ids = torch.tensor([[pad] * (width - len(r.context_ids)) + r.context_ids for r in admitted], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(r.context_ids)) + [1] * len(r.context_ids) for r in admitted], device=loaded.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        cache = getattr(out, loaded.cache_kwarg, None) or out.past_key_values
        tokens = next_tokens(out.logits[:, -1, :], [r.sampler for r in admitted], [0] * len(admitted), loaded.fmt.stop_ids)
        positions = mask.sum(-1)
        state = (cache, mask, positions, torch.tensor(tokens, device=loaded.device))
        return self._retire(admitted, state, tokens)

    def _merge(self, state, new_state):
        cache, mask, positions, next_input = state
        new_cache, new_mask, new_positions, new_input = new_state
        mask = kvcache.merge(cache, mask, new_cache, new_mask)
        return cache, mask, torch.cat([positions, new_positions]), torch.cat([next_input, new_input])

    def _retire(self, rows: list[_Request], state, tokens: list[int]):
        """Append each row's token; finish rows that stopped; keep the others."""
        stop_ids = self._loaded.fmt.stop_ids
        keep = []
        for i, (request, token) in enumerate(zip(rows, tokens)):
            stopped = token in stop_ids
            if not stopped:
                request.generated.append(token)
            if request.future.cancelled():
                continue
            if stopped or len(request.generated) >= request.params.max_new_tokens:
                self._complete(request)
            else:
                keep.append(i)
        if len(keep) == len(rows):
            return rows, state
        if not keep:
            return [], None
        cache, mask, positions, next_input = state
        mask = kvcache.select(cache, mask, keep)
        index = torch.tensor(keep, device=positions.device)
        return [rows[i] for i in keep], (cache, mask, positions.index_select(0, index), next_input.index_select(0, index))

    def _complete(self, request: _Request) -> None:
        loaded = self._loaded
        text = loaded.fmt.decode(request.generated)
        if not text and request.attempt < 2:  # empty: try again with sampling
            retry = dataclasses.replace(request, attempt=request.attempt + 1, generated=[], sampler=None,
                                        params=dataclasses.replace(request.params, do_sample=True,
                                                                   seed=None if request.params.seed is None else request.params.seed + 1))
            with self._wake:
                self._queue.appendleft(retry)
            return
        latency = time.monotonic() - request.enqueued_at
        fallback = not text
        reply = Reply(text=text or self.fallback_reply, model_version=request.version,
                      new_tokens=len(request.generated), latency_s=latency, fallback=fallback)
        self._latencies.append(latency)
        self.replies_served += 1
        request.finish(reply)
