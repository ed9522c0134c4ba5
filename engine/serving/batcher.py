"""The generation engine: one worker thread owns the model and serves every chat.

Requests from all chats go into one bounded queue. The worker runs continuous batching:
at each decode step, waiting requests are prefilled and merged into the running batch
(KV cache rows), every row gets one token with its own sampling settings, and finished
rows leave at once. The model's forward passes go through one seam, a decoder
(engine.serving.fastpath: a hand-written GPT-2 or Llama step on a static KV cache where the model
is GPT-2- or Llama-family and `fast_path="auto"`, else transformers' own forward, hf_step). So a short reply never waits for a
long one and a new chat never waits for a whole batch. Torch runs in this thread, never
in the event loop. A model swap happens between batches: rows in flight finish on the
model they started with, and each reply names the version that wrote it.

Shapes in comments: B rows of the running batch, U distinct contexts in one prefill, V vocabulary.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from engine.model import LoadedModel
from engine.serving import sentences
from engine.serving.admission import AdmissionGate
from engine.serving.fastpath import FAST_PATH_MODES, pick_decoder
from engine.serving.fastpath.onednn import fp32_packing, pack_if_faster
# EngineBusy, EngineStopped and Reply are the contract's (protocol.py); importing them from here still works
from engine.serving.protocol import (FALLBACK_REPLY, EngineBusy, EngineStats, EngineStopped, ModelEngine, Reply,
                                     ReplyStream, SamplingParams, Route)
from engine.serving.quantize import pack_fp32, release_freed_memory
from engine.serving.sampling import BatchSampler, RowSampler, banned_ids
from engine.serving.spare_cores import SpareCores
from engine.serving.worker import WorkerThread, auto_threads, resolve
from engine.types import Turn, max_positions, percentile

log = logging.getLogger(__name__)

# Streamed rows get new text at most this often (the first words at once): every push wakes
# the event loop, which then competes with this thread for the GIL, and a platform shows at
# most one edit or draft per `[chat] stream_edit_seconds` anyway.
STREAM_PUSH_S = 0.1


def _push_all(pushes: list) -> None:
    """Event loop: hand each stream its delta (one wake-up of the loop per decode step, not one per row)."""
    for stream, delta in pushes:
        stream.push(delta)


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
    stream: ReplyStream | None = None   # streaming: decoded text goes to it after every step
    streamed: str = ""                  # the text pushed to `stream` so far (worker side)
    pushed_at: float = 0.0              # when it was last pushed (worker side, time.monotonic)

    def stream_due(self, now: float, every_s: float) -> bool:
        """Worker thread: time to hand the stream new text (the first words at once, then every `every_s`)."""
        return self.stream is not None and (not self.streamed or now - self.pushed_at >= every_s)

    def text_delta(self, text: str, now: float) -> str:
        """Worker thread: what `text` adds to what the stream already has ("" for nothing yet).

        Byte-level BPE decodes a half-written character as U+FFFD until the rest arrives, so
        trailing ones are held back; text that does not extend what was sent waits too."""
        text = text.rstrip("\ufffd")
        if not text.startswith(self.streamed) or len(text) == len(self.streamed):
            return ""
        delta, self.streamed, self.pushed_at = text[len(self.streamed):], text, now
        return delta

    def finish(self, result) -> None:
        resolve(self, result)


class Engine(WorkerThread, ModelEngine):
    """Async front (`reply`) over a batching worker thread (`_run`): the local ModelEngine."""

    stream_push_s = STREAM_PUSH_S  # streamed rows get new text at most this often (the first words at once)

    def __init__(
        self,
        loaded: LoadedModel,
        defaults: SamplingParams | None = None,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_context_tokens: int = 256,
        fallback_reply: str = FALLBACK_REPLY,
        threads: int = 0,
        prefill_threads: int = 0,
        grow_cache: bool = True,
        pack_weights: bool = True,
        fast_path: str = "auto",
        busy_hook: Callable[[bool], None] | None = None,
    ):
        if fast_path not in FAST_PATH_MODES:
            raise ValueError(f"fast_path must be one of {', '.join(FAST_PATH_MODES)}, not {fast_path!r}")
        self.defaults = defaults or SamplingParams()
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_context_tokens = max_context_tokens
        self.fallback_reply = fallback_reply
        self.threads = threads
        # A prefill (a burst's first words wait on it) may also take cores no other process is using:
        # 0 = all such cores, N = at most N in all; N <= the decode threads turns it off (spare_cores.py).
        self.prefill_threads = prefill_threads
        self._spare = SpareCores()
        self.grow_cache = grow_cache  # KV cache with spare room (kvcache.GrowingLayer) where the model allows it
        self.pack_weights = pack_weights  # fp32 CPU models: linear weights pre-packed for oneDNN (quantize.pack_fp32)
        self.fast_path = fast_path  # "auto": GPT-2- and Llama-family models decode on engine.serving.fastpath; "off": transformers
        self._busy_hook, self._busy = busy_hook, False   # set_busy_hook: hook(True) on work after idle, hook(False)
        self._decoder = None  # the model seam (fastpath.FastDecoder or hf_step.HFDecoder), made in the worker
        self._threads_wanted: int | None = None  # set_threads(): applied by the worker between steps
        self.threads_now: int | None = None  # the worker's torch threads after its last set_threads
        self._loaded = loaded
        self._pending_swap: tuple[LoadedModel, concurrent.futures.Future] | None = None
        self._prepare(loaded)
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = threading.Condition()
        self.admission = AdmissionGate(self._wake)  # a platform's burst is admitted as one batch (admission.py)
        self._running = False
        self._thread: threading.Thread | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._active = 0  # rows in the running batch (written by the worker, read by stats())
        self.replies_served = 0
        self.started_at = time.time()
        # Where the worker's time goes (read by `mynah bench`): seconds and counts since start.
        self.timing = {"prefill_s": 0.0, "prefilled_tokens": 0, "decode_s": 0.0, "decode_steps": 0, "decode_rows": 0,
                       "prefills": 0, "spread_prefills": 0, "prefill_threads": 0, "decode_threads": 0}

    # ---- public, event-loop side -------------------------------------------------
    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
                    route: Route = None, stream: ReplyStream | None = None) -> Reply:
        """The bot's next turn for a chat whose history (oldest first) is `turns`
        (`stream`, when given, gets the text after every decode step)."""
        params = self.defaults.merged(overrides)
        loop = asyncio.get_running_loop()
        request = _Request(context_ids=[], params=params, loop=loop, future=loop.create_future(),
                           enqueued_at=time.monotonic(), stream=stream)
        request.context_ids = self._context_ids(self._loaded, turns, params, system)
        return await self._admit(request)

    def stream(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
               route: Route = None) -> ReplyStream:
        """The reply as it is decoded: the worker pushes each step's new text (ReplyStream)."""
        return ReplyStream(lambda stream: self.reply(turns, overrides, system=system, stream=stream))

    def swap(self, loaded: LoadedModel) -> concurrent.futures.Future:
        """Serve `loaded` from the next batch on; rows in flight finish on the old model. The
        future resolves to its version once the worker serves it (`await asyncio.wrap_future(...)`),
        so whoever says "now serving" can wait until it is true."""
        landed: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if not self._running:      # no worker: the next start serves it
                self._loaded = loaded
                self._prepare(loaded)
                landed.set_result(loaded.version)
                return landed
            if self._pending_swap is not None:
                self._pending_swap[1].set_result(None)   # superseded before it landed
            self._pending_swap = (loaded, landed)
            self._wake.notify()
        return landed

    # ---- helpers ----------------------------------------------------------------
    def set_threads(self, threads: int) -> None:
        """Run the model's work on `threads` torch threads from the next step on (0: worker.auto_threads()).

        The learning loop drops the engine to one thread while a trainer child runs: on a
        2-core machine two engine threads next to a busy process collapse (each parallel
        region waits for the thread that lost its core). torch.set_num_threads only
        affects the calling thread's pool, so the worker applies it.
        """
        with self._wake:
            self._threads_wanted = int(threads)
            self._wake.notify()

    def set_busy_hook(self, hook) -> None:
        """Call hook(True) from the worker when it starts work after being idle, hook(False) when idle again.

        The learning loop pauses its trainer child with it while chats are being answered
        (bots.learning.quiet). None removes the hook.
        """
        self._busy_hook, self._busy = hook, False

    def _tell_busy(self, busy: bool) -> None:
        hook = self._busy_hook
        if hook is not None and busy != self._busy:
            self._busy = busy
            try:
                hook(busy)
            except Exception:  # the hook is the caller's business; serving goes on
                log.exception("busy hook failed")

    def _apply_threads(self) -> None:
        wanted, self._threads_wanted = self._threads_wanted, None
        if wanted is not None:
            torch.set_num_threads(wanted if wanted > 0 else (self.threads or auto_threads()))
            self.threads_now = torch.get_num_threads()
            log.info("engine now runs on %d torch thread(s)", self.threads_now)

    def _prepare(self, loaded: LoadedModel) -> None:
        """Per-model facts the worker needs: banned ids, context limit."""
        loaded.max_positions = max_positions(loaded.model)
        loaded.banned_word_ids = {}

    def _context_ids(self, loaded: LoadedModel, turns: Sequence[Turn], params: SamplingParams,
                     system: str = "") -> list[int]:
        budget = min(self.max_context_tokens, loaded.max_positions - params.max_new_tokens)
        if budget < 8:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for context in a {loaded.max_positions}-position model")
        return loaded.fmt.context_ids(list(turns), budget, system)

    def _make_decoder(self, loaded: LoadedModel) -> None:
        """THE model seam: pick the decoder every forward pass of the worker goes through.

        GPT-2- and Llama-family models take the fast path (fastpath.FastDecoder), its fp32 layers
        packed for Mynah's fp32 kernel (or oneDNN) on CPUs where MKL is the slower (fastpath.onednn:
        every CPU but Intel's; 1.5-2x on the AMD boxes); other models take transformers' forward, whose fp32 CPU weights are
        packed for oneDNN once (quantize.pack_fp32; 1.5-2.4x its default path). In the worker
        thread on purpose: once another thread has run torch's parallel regions, this thread's steps
        ran ~1.5x slower on 2 cores (measured), so the worker does all the model's work itself.
        """
        self._decoder = pick_decoder(loaded.model, self.fast_path, pad_id=loaded.fmt.pad_id, grow_cache=self.grow_cache)
        if self._decoder.name == "fast" and self.pack_weights and not getattr(loaded, "packed", False) \
                and loaded.device.type == "cpu":
            started = time.perf_counter()
            self._decoder = None  # it holds the unpacked weights: each must be freed as soon as it is packed
            try:
                loaded.packed = pack_if_faster(loaded.model) > 0  # fp32 layers only (int8 ones are not nn.Linear)
            except Exception:  # an optimisation only: serve what is packed and what is not as they are
                log.exception("could not pack the fp32 layers; serving them as they are")
                loaded.packed = True  # do not try again on the next swap of this model
            if loaded.packed:
                log.info("fp32 layers packed for %s (faster on this CPU) in %.1f s",
                         "Mynah's fp32 kernel" if fp32_packing() == "native" else "oneDNN", time.perf_counter() - started)
            self._decoder = pick_decoder(loaded.model, self.fast_path, pad_id=loaded.fmt.pad_id, grow_cache=self.grow_cache)
        if self._decoder.name == "transformers" and self.pack_weights and not getattr(loaded, "packed", False) \
                and loaded.device.type == "cpu":
            started = time.perf_counter()
            try:
                loaded.packed = pack_fp32(loaded.model) > 0
            except Exception:  # an optimisation only: serve the model as it is
                log.exception("could not pack the fp32 weights; serving them unpacked")
                loaded.packed = False
            if loaded.packed:
                log.info("fp32 weights packed for oneDNN in %.1f s", time.perf_counter() - started)
        release_freed_memory()  # int8 Llama: the layers' own packed weights the fused calls replaced
        log.info("decoding with the %s decoder", self._decoder.name)

    def _run(self) -> None:
        """The worker thread: every forward pass runs here, with `__torch_function__` dispatch off.

        The model work passes only plain tensors (no subclass relies on that dispatch), and with
        it on every int8 call paid for a C++ exception: torch asks fbgemm's packed weights (a
        TorchScript object) for `__torch_function__`, the lookup throws inside libtorch and is
        caught, ~12 us a call (linear_dynamic 16.7 -> 4.3 us on a tiny matrix; 121 calls a
        SmolLM2 step), on the fast path and in transformers' forward alike.

        TorchScript's optimizing executor is off in this thread (the fast paths' compiled layers,
        fastpath.compiled): it profiles the first calls and keeps specialised graphs guarded by shape
        checks, which here cost ~12 MB of RSS and gained nothing on the CPU (SmolLM2 int8 step
        18.4 ms with it, 17.1 ms without, the same tokens).
        """
        torch.set_num_threads(self.threads if self.threads > 0 else auto_threads())
        self.threads_now = torch.get_num_threads()
        self._make_decoder(self._loaded)
        batch: _Batch | None = None
        with torch.inference_mode(), torch._C.DisableTorchFunctionSubclass(), torch.jit.optimized_execution(False):
            while True:
                swapped, landed = False, None
                self._spare.tick()  # at most every 0.5 s: what other processes use, for the next prefill
                if self._threads_wanted is not None:
                    self._apply_threads()
                with self._wake:
                    if batch is None and self._pending_swap is not None:
                        previous = self._loaded
                        (self._loaded, landed), self._pending_swap = self._pending_swap, None
                        self._prepare(self._loaded)
                        swapped = True
                        log.info("now serving model version %s", self._loaded.version)
                    admitted = []
                    hold_s = self.admission.waiting_s() if self._queue else 0.0  # a burst's siblings are on their way
                    if self._pending_swap is None and not hold_s:
                        running = len(batch.rows) if batch else 0
                        while self._queue and running + len(admitted) < self.max_batch_size:
                            admitted.append(self._queue.popleft())
                    if batch is None and not admitted and not swapped:
                        if not self._running and not self._queue:
                            return
                        if self._threads_wanted is None:
                            self._wake.wait(timeout=min(hold_s, 0.5) if hold_s else 0.5)
                        continue
                if swapped:  # outside the lock: reply() must not wait for this
                    try:
                        self._make_decoder(self._loaded)
                    except Exception as exc:  # a model that cannot be served: keep serving the one that could
                        log.exception("model version %s cannot be served; still serving %s", self._loaded.version,
                                      previous.version)
                        landed.set_exception(exc)
                        self._loaded = previous
                        self._make_decoder(previous)
                    else:
                        landed.set_result(self._loaded.version)
                    if batch is None and not admitted:
                        continue
                if admitted and batch is None:
                    self._tell_busy(True)
                try:
                    batch = self._step(batch, admitted)
                except Exception as exc:  # a broken model must not take the bot down
                    log.exception("generation failed")
                    for request in (batch.rows if batch else []) + admitted:
                        request.finish(RuntimeError(f"generation failed: {exc}"))
                    batch = None
                self._active = len(batch.rows) if batch else 0
                if batch is None and not self._queue:
                    self._tell_busy(False)
                    release_freed_memory(collect=False)  # idle: hand the burst's KV cache and activations back to the OS

    def _step(self, batch: "_Batch | None", admitted: list[_Request]) -> "_Batch | None":
        """Admit new requests (prefill, merge), then one decode step for every running row."""
        loaded = self._loaded
        if admitted:
            started = time.perf_counter()
            joining = self._spread(lambda: self._prefill(loaded, admitted, batch))
            self.timing["prefill_s"] += time.perf_counter() - started
            self.timing["prefilled_tokens"] += sum(len(r.context_ids) for r in admitted)
            if joining is not None:
                if batch is None:
                    batch = joining
                else:
                    batch.merge(joining)
        if batch is None:
            return None
        started = time.perf_counter()
        logits = self._decoder.decode(batch.state, batch.next_input)  # (B, V): the model seam
        tokens = batch.sampler.sample(logits, [len(r.generated) for r in batch.rows], inplace=True)
        batch.next_input = torch.tensor(tokens, device=loaded.device)  # (B,)
        self.timing["decode_s"] += time.perf_counter() - started
        self.timing["decode_steps"] += 1
        self.timing["decode_rows"] += len(batch.rows)
        self.timing["decode_threads"] = torch.get_num_threads()
        return self._retire(batch, tokens)

    def _spread(self, prefill):
        """Run `prefill` on the decode threads plus the cores other processes leave idle (spare_cores.py):
        a burst's first words come after its prefill, and the event loop's core is mostly idle then."""
        base = self.threads_now or torch.get_num_threads()
        if self._loaded.device.type != "cpu":
            return prefill()
        most = self.prefill_threads or len(self._spare.cpus)
        threads = self._spare.threads(base, most)
        self.timing["prefills"] += 1
        self.timing["prefill_threads"] = threads
        if threads == base:
            return prefill()
        self.timing["spread_prefills"] += 1
        torch.set_num_threads(threads)
        try:
            return prefill()
        finally:
            torch.set_num_threads(base)

    def _prefill(self, loaded: LoadedModel, admitted: list[_Request], running: "_Batch | None" = None) -> "_Batch | None":
        """Run the new requests' contexts (one pass) and sample their first tokens (`running`: the batch
        they will join, whose rows the new cache makes room for).

        Requests with the same context (MMI candidates, retries) share one prefill row; their
        KV cache rows are copied afterwards.
        """
        for request in admitted:
            request.version = loaded.version
            request.sampler = RowSampler(request.params, request.context_ids, banned_ids(loaded, request.params))
        unique: dict[tuple[int, ...], int] = {}
        expand = [unique.setdefault(tuple(r.context_ids), len(unique)) for r in admitted]
        room = max(r.params.max_new_tokens for r in admitted)
        state, logits = self._decoder.prefill([list(c) for c in unique], expand, room,
                                              running.state if running else None)  # (B, V): the model seam
        sampler = BatchSampler([r.sampler for r in admitted], loaded.fmt.stop_ids)
        tokens = sampler.sample(logits, [0] * len(admitted), inplace=True)
        next_input = torch.tensor(tokens, device=loaded.device)  # (B,)
        batch = _Batch(list(admitted), state, next_input, sampler)
        return self._retire(batch, tokens)

    def _retire(self, batch: "_Batch", tokens: list[int]) -> "_Batch | None":
        """Append each row's token; finish rows that stopped; keep the others."""
        stop_ids = self._loaded.fmt.stop_ids
        keep, pushes, now = [], {}, time.monotonic()
        for i, (request, token) in enumerate(zip(batch.rows, tokens)):
            stopped = token in stop_ids
            if not stopped:
                request.generated.append(token)
            if request.future.cancelled():
                continue
            if stopped or len(request.generated) >= request.params.max_new_tokens \
                    or sentences.rambles(self._loaded.fmt, request.params, request.generated, token):
                self._complete(request)
            else:
                if request.stream_due(now, self.stream_push_s):
                    delta = request.text_delta(self._loaded.fmt.decode(request.generated), now)
                    if delta:
                        pushes.setdefault(request.loop, []).append((request.stream, delta))
                keep.append(i)
        for loop, items in pushes.items():
            loop.call_soon_threadsafe(_push_all, items)
        if len(keep) == len(batch.rows):
            return batch
        if not keep:
            self._decoder.release(batch.state)
            return None
        batch.select(keep)
        return batch

    def _complete(self, request: _Request) -> None:
        loaded = self._loaded
        text = sentences.finish_reply(loaded.fmt.decode(request.generated),
                                      hit_limit=request.params.finish_sentences
                                      and len(request.generated) >= request.params.max_new_tokens)
        if not text and request.attempt < 2:  # empty: try again with sampling
            retry = dataclasses.replace(request, attempt=request.attempt + 1, generated=[], sampler=None, streamed="", pushed_at=0.0,
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


@dataclass
class _Batch:
    """The running batch: one row per request, everything aligned on the row index."""

    rows: list[_Request]
    state: object               # the decoder's KV cache and positions (fastpath.FastState / hf_step.HFState)
    next_input: torch.Tensor    # (B,) the token each row feeds next
    sampler: BatchSampler

    def merge(self, other: "_Batch") -> None:
        """Append `other`'s rows."""
        self.state.merge(other.state)
        self.next_input = torch.cat([self.next_input, other.next_input])  # (B + B',)
        self.sampler.merge(other.sampler)
        self.rows = self.rows + other.rows

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` only, in that order."""
        self.state.select(keep)
        index = torch.tensor(keep, device=self.next_input.device)  # (B',)
        self.next_input = self.next_input.index_select(0, index)  # (B',)
        self.sampler.select(keep)
        self.rows = [self.rows[i] for i in keep]
