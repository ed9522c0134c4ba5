"""An optional local backend on CTranslate2 (`[engine] backend = "ctranslate2"`, needs `mynah[bench]`).

Why it exists: on the machine docs/BENCHMARKS.md was measured on, CTranslate2's int8 kernels
answer a lone chat faster than Mynah's own engine, while Mynah's engine wins with many chats
and with chats arriving at different times (continuous batching). Pick by traffic; see
docs/BENCHMARKS.md.

The HF model folder is converted once with CTranslate2's converter into a cache folder
(`$MYNAH_CT2_CACHE`, else `~/.cache/mynah/ct2/<hash of the model path>/ct2-<int8|float32>/`;
re-converted when the weights are newer; the learning loop's promotions call `swap` with the
new version's folder, which converts it), or into a temporary folder when there is no
writable cache. One worker thread serves a queue:
whatever is waiting (up to max_batch_size, grouped by sampling settings) runs as one
`generate_batch`; a request that arrives meanwhile waits for that batch to end (CTranslate2
cannot add a row to a running batch). The same dialogue format, context budget, stop ids,
banned words and fallback text as the local engine.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from engine.model import LoadedModel
from engine.serving import sentences
from engine.serving.protocol import (FALLBACK_REPLY, EngineBusy, EngineStats, EngineStopped, Reply, ReplyStream,
                                     SamplingParams, Route)
from engine.serving.worker import WorkerThread, auto_threads, resolve
from engine.types import Turn, max_positions, percentile

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where conversions live: $MYNAH_CT2_CACHE, else $XDG_CACHE_HOME/mynah/ct2 (~/.cache/mynah/ct2)."""
    if os.environ.get("MYNAH_CT2_CACHE"):
        return Path(os.environ["MYNAH_CT2_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mynah" / "ct2"


def converted_folder(model_path: str, precision: str) -> str:
    """The CTranslate2 conversion of the HF folder `model_path` (made or refreshed when needed)."""
    from ctranslate2.converters import TransformersConverter

    quantization = "int8" if precision == "int8" else "float32"
    source = Path(model_path)
    weights = max((p.stat().st_mtime for p in source.glob("*.safetensors")), default=0.0) or \
        max((p.stat().st_mtime for p in source.glob("*.bin")), default=0.0)
    target = cache_root() / hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16] / f"ct2-{quantization}"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: convert into a temporary folder
        target = Path(tempfile.mkdtemp(prefix="mynah-ct2-")) / f"ct2-{quantization}"
    done = target / "model.bin"
    if not done.exists() or done.stat().st_mtime < weights:
        started = time.perf_counter()
        TransformersConverter(str(source)).convert(str(target), quantization=quantization, force=True)
        log.info("converted %s to CTranslate2 (%s) in %.1f s", source, quantization, time.perf_counter() - started)
    return str(target)


@dataclasses.dataclass
class _Job:
    context_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float


class CT2Engine(WorkerThread):
    """A ReplyEngine (with `swap`) answering from a CTranslate2 Generator on the CPU."""

    thread_name = "mynah-ct2"

    def __init__(self, loaded: LoadedModel, defaults: SamplingParams | None = None, *, precision: str = "int8",
                 max_batch_size: int = 16, max_queue: int = 256, max_context_tokens: int = 256,
                 fallback_reply: str = FALLBACK_REPLY, threads: int = 0):
        self.defaults, self.precision, self.threads = defaults or SamplingParams(), precision, threads
        self.max_batch_size, self.max_queue, self.max_context_tokens = max_batch_size, max_queue, max_context_tokens
        self.fallback_reply = fallback_reply
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._active = 0
        self.replies_served = 0
        self.started_at = time.time()
        self._load(loaded)

    def _load(self, loaded: LoadedModel) -> None:
        import ctranslate2

        folder = converted_folder(loaded.path, self.precision)
        self._generator = ctranslate2.Generator(folder, device="cpu", compute_type="int8" if self.precision == "int8"
                                                else "float32", intra_threads=self.threads or auto_threads())
        vocab = loaded.tokenizer.convert_ids_to_tokens(list(range(len(loaded.tokenizer))))
        self._vocab = vocab
        loaded.max_positions = max_positions(loaded.model)
        self._loaded = loaded

    def swap(self, loaded: LoadedModel) -> concurrent.futures.Future:
        """Convert and serve `loaded` (blocking this call; the worker picks it up for its next batch).
        The returned future is already resolved: the next batch is the new model's."""
        with self._wake:
            self._load(loaded)
        landed: concurrent.futures.Future = concurrent.futures.Future()
        landed.set_result(loaded.version)
        return landed

    def set_threads(self, threads: int) -> None:  # CTranslate2 fixes its threads when the Generator is made
        log.debug("CTranslate2 backend: thread count stays %s", self.threads or "default")

    def stream(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
               route: Route = None) -> ReplyStream:
        """CTranslate2 decodes a whole batch in one call: the stream yields the whole reply once."""
        async def produce(stream: ReplyStream) -> Reply:
            reply = await self.reply(turns, overrides, system=system, route=route)
            stream.push(reply.text)
            return reply

        return ReplyStream(produce)

    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
                    route: Route = None) -> Reply:
        params = self.defaults.merged(overrides)
        budget = min(self.max_context_tokens, self._loaded.max_positions - params.max_new_tokens)
        if budget < 8:
            raise ValueError(f"max_new_tokens={params.max_new_tokens} leaves no room for context")
        loop = asyncio.get_running_loop()
        ids = self._loaded.fmt.context_ids(list(turns), budget, system)
        job = _Job(ids, params, loop, loop.create_future(), time.monotonic())
        return await self._admit(job)

    # ---- worker ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._queue:
                    self._wake.wait(timeout=0.5)
                if not self._queue:
                    return
                first = self._queue.popleft()
                batch = [first]
                for job in list(self._queue):  # same settings → same call
                    if len(batch) < self.max_batch_size and job.params == first.params:
                        self._queue.remove(job)
                        batch.append(job)
                generator, loaded = self._generator, self._loaded
            self._active = len(batch)
            try:
                self._serve(generator, loaded, batch)
            except Exception as exc:  # a broken model must not take the bot down
                log.exception("generation failed")
                for job in batch:
                    resolve(job, RuntimeError(f"generation failed: {exc}"))
            self._active = 0

    def _serve(self, generator, loaded: LoadedModel, batch: list[_Job]) -> None:
        import ctranslate2

        p = batch[0].params
        if p.seed is not None:
            ctranslate2.set_random_seed(p.seed)
        banned = [[t] for t in sorted(loaded.fmt.banned_ids)]
        for word in p.banned_words:
            banned += [loaded.fmt.encode_text(v) for v in (word, " " + word)]
        kwargs = dict(max_length=p.max_new_tokens, min_length=p.min_new_tokens, include_prompt_in_result=False,
                      repetition_penalty=p.repetition_penalty, end_token=[self._vocab[i] for i in sorted(loaded.fmt.stop_ids)],
                      suppress_sequences=[[self._vocab[i] for i in s] for s in banned if s] or None)
        if p.do_sample:
            kwargs.update(sampling_topk=p.top_k or 0, sampling_topp=p.top_p, sampling_temperature=p.temperature)
        results = generator.generate_batch([[self._vocab[i] for i in job.context_ids] for job in batch], **kwargs)
        for job, result in zip(batch, results):
            ids = [i for i in result.sequences_ids[0] if i not in loaded.fmt.stop_ids]
            text = sentences.finish_reply(loaded.fmt.decode(ids), hit_limit=p.finish_sentences and len(ids) >= p.max_new_tokens)
            latency = time.monotonic() - job.enqueued_at
            self._latencies.append(latency)
            self.replies_served += 1
            resolve(job, Reply(text=text or self.fallback_reply, model_version=loaded.version, new_tokens=len(ids),
                              latency_s=latency, fallback=not text))
