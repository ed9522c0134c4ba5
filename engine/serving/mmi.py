"""MMI reranking: sample N candidate replies, keep the one that best explains the context.

GPT2-chitchat's interact_mmi.py and DialoGPT's reverse model: a forward model P(reply |
context) samples candidates; a *backward* model, trained on the same dialogues with the
turns in reverse order (`mynah train --reverse`), scores P(context | reply). Generic
replies ("i don't know", "lol") fit every context, so they explain none of them well and
lose to a reply that is about what was said.

    combined = (1 - weight) * forward + weight * backward

forward  = mean log-prob per token of the candidate (and its closing token) given the
           context, under the forward model, in one batched scoring pass;
backward = log-prob of the whole context given the candidate under the backward model,
           summed over the context's tokens (minus the backward model's total loss). The
           context is the same for every candidate, so for ranking by the backward model
           alone (weight 1.0, GPT2-chitchat's interact_mmi) sum and mean agree; in the mix
           the sum keeps the backward evidence at full strength. A per-token mean would
           divide it by the context length: measured on chitchat-dataset, its spread
           across candidates was ~9x smaller than the forward score's, so weights up to
           ~0.95 just reranked by the forward model, which prefers short stock replies
           ("Yeah!"). weight 0.0 is forward-only. See docs/MMI.md.

`MMIEngine` wraps a local engine (a `ModelEngine`, see protocol.py) and is one itself, so
the console, Telegram and Discord use it unchanged. Each reply() sends N requests with
distinct seeds to the engine at once: they are decoded in the same continuous batch as
every other chat's requests. Scoring runs off the event loop (asyncio.to_thread), one
scoring pass at a time (one lock), batched over the candidates.

Both models see text, not the other's token ids: the backward model may have its own
tokenizer and dialogue format. The forward score re-encodes the candidate text, which can
differ from the sampled ids where a tokenizer has several spellings of the same text.

Shapes in comments: C candidate sequences being scored, T their padded length, V vocabulary.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from engine.model import LoadedModel
from engine.serving.protocol import (EngineStats, EngineWrapper, MMIStats, ModelEngine, Reply, ReplyStream, Route,
                                     SamplingParams)
from engine.types import Turn, max_positions, percentile

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- choosing

def combined_scores(forward_scores: Sequence[float], backward_scores: Sequence[float], weight: float) -> list[float]:
    """(1 - weight) * forward + weight * backward, per candidate."""
    if len(forward_scores) != len(backward_scores):
        raise ValueError(f"{len(forward_scores)} forward scores but {len(backward_scores)} backward scores")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the MMI weight must be in [0, 1], got {weight}")
    return [(1.0 - weight) * f + weight * b for f, b in zip(forward_scores, backward_scores)]


def pick_best(candidates: Sequence[str], forward_scores: Sequence[float], backward_scores: Sequence[float],
              weight: float) -> int:
    """Index of the candidate with the highest combined score (the first one on a tie).

    Scores are log-probabilities: higher is better. Empty candidates never win unless
    every candidate is empty.
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    if len(candidates) != len(forward_scores):
        raise ValueError(f"{len(candidates)} candidates but {len(forward_scores)} forward scores")
    combined = combined_scores(forward_scores, backward_scores, weight)
    usable = [i for i, c in enumerate(candidates) if c.strip()] or list(range(len(candidates)))
    best = usable[0]
    for i in usable[1:]:
        if combined[i] > combined[best]:
            best = i
    return best


# --------------------------------------------------------------------------- scoring

@torch.inference_mode()
def _logprobs(loaded: LoadedModel, sequences: list[list[int]], starts: list[int], mean: bool = True) -> list[float]:
    """Log-prob of tokens seq[start:] given seq[:start] (mean or sum), for each sequence, in one batch.

    Right padding with an attention mask; a sequence with nothing to score gets 0.0.
    """
    scores = [0.0] * len(sequences)
    rows = [i for i, (s, a) in enumerate(zip(sequences, starts)) if 0 < a < len(s)]
    if not rows:
        return scores
    width = max(len(sequences[i]) for i in rows)
    pad = loaded.fmt.pad_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (C, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (C, T)
    target = torch.zeros((len(rows), width), dtype=torch.bool)  # (C, T) positions whose token is scored
    for r, i in enumerate(rows):
        seq = sequences[i]
        ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[r, :len(seq)] = 1
        target[r, starts[i]:len(seq)] = True
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    out = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False)  # out.logits: (C, T, V)
    logits = out.logits[:, :-1, :].float()  # (C, T - 1, V): position t predicts token t + 1
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()  # (C, T - 1)
    scored = target[:, 1:]  # (C, T - 1)
    for r, i in enumerate(rows):
        picked = logprobs[r][scored[r]]  # (tokens scored in row r,)
        scores[i] = float(picked.mean() if mean else picked.sum())
    return scores


def forward_sequences(loaded: LoadedModel, turns: Sequence[Turn], candidates: Sequence[str],
                      max_context_tokens: int = 256) -> tuple[list[list[int]], list[int]]:
    """(context + candidate + closing token, index of the first candidate token) per candidate."""
    fmt = loaded.fmt
    encoded = [fmt.encode_text(c) + [fmt.turn_end_id] for c in candidates]
    positions = max_positions(loaded.model)
    encoded = [e[:max(1, positions - 8)] for e in encoded]  # absurdly long candidate: score its head
    budget = max(8, min(max_context_tokens, positions - max(len(e) for e in encoded)))
    context = fmt.context_ids(list(turns), budget) if turns else list(fmt.start_ids) or [fmt.turn_end_id]
    return [context + e for e in encoded], [len(context)] * len(encoded)


def backward_sequences(loaded: LoadedModel, turns: Sequence[Turn], candidates: Sequence[str],
                       max_context_tokens: int = 256) -> tuple[list[list[int]], list[int]]:
    """(candidate, then the context turns newest first; index of the first context token).

    The same context tokens follow every candidate, so the backward scores compare like
    with like. The oldest turns are dropped first when the model's positions run out.
    """
    fmt = loaded.fmt
    positions = max_positions(loaded.model)
    heads = [list(fmt.start_ids) + fmt.encode_text(c) + [fmt.turn_end_id] for c in candidates]
    heads = [h[:max(1, positions // 2)] for h in heads]
    budget = min(max_context_tokens, positions - max((len(h) for h in heads), default=0))
    tail: list[int] = []
    for _, text in reversed(list(turns)):
        piece = fmt.encode_text(text) + [fmt.turn_end_id]
        if len(tail) + len(piece) > budget:
            if not tail:  # the newest turn alone is too long: keep its beginning
                tail = piece[:budget]
            break
        tail += piece
    return [h + tail for h in heads], [len(h) for h in heads]


def forward_scores(loaded: LoadedModel, turns: Sequence[Turn], candidates: Sequence[str],
                   max_context_tokens: int = 256) -> list[float]:
    """Mean log-prob per token of each candidate (with its closing token) given the context."""
    if not candidates:
        return []
    return _logprobs(loaded, *forward_sequences(loaded, turns, candidates, max_context_tokens), mean=True)


def backward_scores(loaded: LoadedModel, turns: Sequence[Turn], candidates: Sequence[str],
                    max_context_tokens: int = 256) -> list[float]:
    """Log-prob of the context given each candidate (summed over the context's tokens), under
    the backward model. The same context tokens follow every candidate.

    No context (an unconditional sample) means nothing to explain: every score is 0.
    """
    if not candidates:
        return []
    if loaded.fmt.name == "chat_template":
        return _template_backward(loaded, turns, candidates)
    return _logprobs(loaded, *backward_sequences(loaded, turns, candidates, max_context_tokens), mean=False)


def _template_backward(loaded: LoadedModel, turns: Sequence[Turn], candidates: Sequence[str]) -> list[float]:
    """Chat-template backward models: the template has no per-turn pieces, so the reply part is
    found as the shared prefix with the template of the reply alone."""
    fmt = loaded.fmt
    context = [text for _, text in reversed(list(turns))]
    sequences, starts = [], []
    for c in candidates:
        full = fmt.dialogue_ids([c] + context)
        head = fmt.dialogue_ids([c])
        start = 0
        while start < min(len(full), len(head)) and full[start] == head[start]:
            start += 1
        sequences.append(full[:max_positions(loaded.model)])
        starts.append(max(1, start))
    return _logprobs(loaded, sequences, starts, mean=False)


# --------------------------------------------------------------------------- the engine wrapper

@dataclass
class Candidate:
    text: str
    reply: Reply
    forward: float = 0.0
    backward: float = 0.0
    combined: float = 0.0


@dataclass
class Reranked:
    """What MMI did for one request: the answer, and every candidate with its scores."""

    reply: Reply
    candidates: list[Candidate]
    chosen: int
    scoring_s: float


class MMIEngine(EngineWrapper, ModelEngine):
    """A ModelEngine that answers with the best of N sampled candidates (see the module docstring).

    Everything but reply() and stats() is the wrapped engine's: the same model, version,
    defaults and context limit. swap_backward() replaces the backward model (the learning
    loop can refresh it).
    """

    def __init__(self, engine: ModelEngine, backward: LoadedModel, *, candidates: int = 8, weight: float = 0.5):
        if candidates < 1:
            raise ValueError(f"MMI needs at least 1 candidate, got {candidates}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"[generation] mmi_weight must be in [0, 1], got {weight}")
        self.engine = engine
        self.backward = backward
        self.candidates = candidates
        self.weight = weight
        self._lock = threading.Lock()  # one scoring pass at a time
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._scoring: collections.deque[float] = collections.deque(maxlen=1000)
        self.replies_served = 0
        self.changed_by_backward = 0  # replies where the backward model overruled the forward favourite

    # ---- ModelEngine, delegated to the wrapped engine ------------------------------
    def set_threads(self, threads: int) -> None:
        setter = getattr(self.engine, "set_threads", None)
        if setter is not None:
            setter(threads)

    def set_busy_hook(self, hook) -> None:
        setter = getattr(self.engine, "set_busy_hook", None)
        if setter is not None:
            setter(hook)

    @property
    def inner(self):
        return self.engine

    model = property(lambda self: self.engine.model)
    max_context_tokens = property(lambda self: self.engine.max_context_tokens)
    max_batch_size = property(lambda self: self.engine.max_batch_size)

    def swap(self, loaded: LoadedModel):
        """Swap the forward model (the engine does it between batches); the engine's future."""
        return self.engine.swap(loaded)

    def swap_backward(self, loaded: LoadedModel) -> None:
        """Score with `loaded` from the next scoring pass on."""
        with self._lock:
            self.backward = loaded

    # ---- ModelEngine, MMI's own -----------------------------------------------------
    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
                    route: Route = None) -> Reply:
        return (await self.rerank(turns, overrides, system=system, route=route)).reply

    def stream(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
               route: Route = None) -> ReplyStream:
        """MMI cannot stream: the reply is chosen only once every candidate is finished and
        scored, so the stream yields the whole reranked reply as one delta."""
        async def produce(stream: ReplyStream) -> Reply:
            reply = await self.reply(turns, overrides, system=system, route=route)
            stream.push(reply.text)
            return reply

        return ReplyStream(produce)

    def stats(self) -> EngineStats:
        """The wrapped engine's queue and model; replies and latencies counted per reranked answer."""
        inner = self.engine.stats()
        latencies = list(self._latencies)
        mmi = MMIStats(candidates=self.candidates, weight=self.weight, backward_model=self.backward.version,
                       candidates_generated=inner.replies, scoring_p50_s=percentile(self._scoring, 0.5),
                       changed_by_backward=self.changed_by_backward)
        return dataclasses.replace(inner, replies=self.replies_served, latency_p50_s=percentile(latencies, 0.5),
                                   latency_p95_s=percentile(latencies, 0.95), mmi=mmi)

    # ---- reranking ---------------------------------------------------------------
    async def rerank(self, turns: Sequence[Turn], overrides: dict | None = None, *, n: int | None = None,
                     system: str = "", route: Route = None) -> Reranked:
        """Sample n candidates in one batch, score them, return the best with all the scores.

        `system` (the persona) reaches the candidates' generation; scoring does not see it."""
        start = time.monotonic()
        turns = list(turns)
        overrides = dict(overrides or {})
        n = self.candidates if n is None else n
        params = self.engine.defaults.merged(overrides)
        if n <= 1 or not params.do_sample:  # greedy decoding would give N copies of one reply
            reply = await self.engine.reply(turns, overrides, system=system, route=route)
            self._record(time.monotonic() - start, 0.0)
            return Reranked(reply, [Candidate(reply.text, reply)], 0, 0.0)

        base = params.seed if params.seed is not None else random.randrange(2**31)
        results = await asyncio.gather(
            *[self.engine.reply(turns, {**overrides, "seed": base + i}, system=system, route=route) for i in range(n)],
            return_exceptions=True)
        replies = [r for r in results if isinstance(r, Reply)]
        if not replies:
            raise next(r for r in results if isinstance(r, BaseException))
        candidates = [Candidate(r.text if not r.fallback else "", r) for r in replies]

        unique = list(dict.fromkeys(c.text for c in candidates if c.text))
        t0 = time.monotonic()
        if len(unique) > 1:
            scores = await asyncio.to_thread(self.score, turns, unique)
            by_text = dict(zip(unique, zip(*scores)))
            for c in candidates:
                if c.text in by_text:
                    c.forward, c.backward = by_text[c.text]
        scoring_s = time.monotonic() - t0
        combined = combined_scores([c.forward for c in candidates], [c.backward for c in candidates], self.weight)
        for c, value in zip(candidates, combined):
            c.combined = value
        chosen = pick_best([c.text for c in candidates], [c.forward for c in candidates],
                           [c.backward for c in candidates], self.weight)
        if len(unique) > 1:
            forward_only = pick_best([c.text for c in candidates], [c.forward for c in candidates],
                                     [c.backward for c in candidates], 0.0)
            if candidates[forward_only].text != candidates[chosen].text:
                self.changed_by_backward += 1

        best = candidates[chosen].reply
        latency = time.monotonic() - start
        reply = dataclasses.replace(best, latency_s=latency)
        self._record(latency, scoring_s)
        return Reranked(reply, candidates, chosen, scoring_s)

    def _record(self, latency: float, scoring_s: float) -> None:
        self._latencies.append(latency)
        self._scoring.append(scoring_s)
        self.replies_served += 1

    def score(self, turns: Sequence[Turn], texts: list[str]) -> tuple[list[float], list[float]]:
        """(forward scores, backward scores) of `texts` as replies to `turns`; blocking (run it in a
        worker thread), one pass at a time."""
        with self._lock:
            limit = self.engine.max_context_tokens
            fwd = forward_scores(self.engine.model, turns, texts, limit)
            bwd = backward_scores(self.backward, turns, texts, limit)
        for value in fwd + bwd:
            if math.isnan(value):
                raise RuntimeError("MMI scoring produced NaN")
        return fwd, bwd
