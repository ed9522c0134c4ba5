"""Choosing the next token for every row of a batch, each row with its own settings.

GPT2-chitchat parity: temperature, top-k, top-p (nucleus), repetition penalty, plus
min/max new tokens, banned tokens and a per-request seed.

The engine keeps one `BatchSampler` per running batch: the rows' settings as small
tensors plus two (B, N) index tensors (tokens seen, tokens banned), so one step is a few
tensor operations on the whole batch whatever its size, not a Python loop per row. Rows
join (`merge`) and leave (`select`) together with the rows of the KV cache. Only the
final draw of a row with its own seed uses that row's random generator.

Order of operations per row: banned tokens → no stop before min_new_tokens →
repetition penalty on every seen token (context and generated) → greedy argmax, or
temperature → top-k → top-p over what top-k left → draw.

Shapes in comments: B rows in the batch, V vocabulary, S rows that sample (not greedy),
K the widest top-k of those, N seen (or banned) ids per row, E rows still under their
min_new_tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engine.serving.protocol import SamplingParams  # defined with the engine's contract; imported from here too


class RowSampler:
    """The per-request state of sampling: settings, random generator, seen tokens."""

    def __init__(self, params: SamplingParams, context_ids: list[int], banned_ids: set[int]):
        self.params = params
        self.seen = set(context_ids)
        self.banned = sorted(banned_ids)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)


_NEG_INF = float("-inf")


class BatchSampler:
    """Sampling state of a running batch, row i belonging to rows[i].

    Seen and banned tokens are kept as [rows, n] index tensors (padded by repeating a
    row's own first entry, which changes nothing: the penalty is applied through
    gather → penalize → scatter, and banning twice bans once), so a step touches
    rows × n entries instead of rows × vocabulary. They are built on the first `sample`
    (when the vocabulary width is known from the logits); afterwards the sampler follows
    the batch through `merge` and `select`, and `sample` appends the chosen tokens.
    """

    def __init__(self, rows: Sequence[RowSampler], stop_ids: set[int] | Sequence[int]):
        self.rows = list(rows)
        self.stop = sorted(stop_ids)
        self.seen: torch.Tensor | None = None     # (B, N) token ids
        self.banned: torch.Tensor | None = None   # (B, N) token ids; None when no row bans anything
        self._settings()

    def __len__(self) -> int:
        return len(self.rows)

    # ---- per-row settings as tensors (rebuilt when the rows change) --------------------
    def _settings(self) -> None:
        params = [r.params for r in self.rows]
        self.min_new = [p.min_new_tokens for p in params]
        self.penalty = torch.tensor([[p.repetition_penalty] for p in params], dtype=torch.float32)  # (B, 1)
        self.any_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.sampled = [i for i, p in enumerate(params) if p.do_sample]
        self.greedy = [i for i, p in enumerate(params) if not p.do_sample]
        sampled = [params[i] for i in self.sampled]
        self.temperature = torch.tensor([[max(p.temperature, 1e-5)] for p in sampled], dtype=torch.float32)  # (S, 1)
        self.top_k = [p.top_k for p in sampled]
        self.top_p = torch.tensor([[p.top_p] for p in sampled], dtype=torch.float32)  # (S, 1)
        self.any_top_p = any(p.top_p < 1.0 for p in sampled)
        self.seeded = [j for j, i in enumerate(self.sampled) if self.rows[i].generator is not None]
        self.unseeded = [j for j, i in enumerate(self.sampled) if self.rows[i].generator is None]
        self._index_cache: dict[str, torch.Tensor] = {}

    def _index(self, name: str, values: list[int]) -> torch.Tensor:
        if name not in self._index_cache:
            self._index_cache[name] = torch.tensor(values, dtype=torch.long)
        return self._index_cache[name]

    def _build(self, vocab: int) -> None:
        self.seen = _padded([sorted(t for t in r.seen if 0 <= t < vocab) for r in self.rows])  # (B, N)
        banned = [[t for t in r.banned if 0 <= t < vocab] for r in self.rows]
        self.banned = _padded(banned) if any(banned) else None  # (B, N)

    # ---- batch surgery, mirroring the KV cache -----------------------------------------
    def merge(self, other: "BatchSampler") -> None:
        """Append `other`'s rows (both have sampled at least once, or neither has)."""
        if (self.seen is None) != (other.seen is None):
            raise ValueError("cannot merge a sampler that has sampled with one that has not")
        if self.seen is not None:
            self.seen = _stack(self.seen, other.seen)  # (B + B', N)
            if self.banned is not None or other.banned is not None:
                self.banned = _stack(self._banned_or_empty(), other._banned_or_empty())
        self.rows += other.rows
        self._settings()

    def _banned_or_empty(self) -> torch.Tensor:
        return self.banned if self.banned is not None else torch.full((len(self.rows), 1), -1, dtype=torch.long)

    def select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, in that order."""
        index = torch.tensor(keep, dtype=torch.long)  # (B',)
        self.rows = [self.rows[i] for i in keep]
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)  # (B', N)
        if self.banned is not None:
            self.banned = self.banned.index_select(0, index)  # (B', N)
            if (self.banned < 0).all():
                self.banned = None
        self._settings()

    # ---- one step ------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, steps: Sequence[int], *, inplace: bool = False) -> list[int]:
        """One token per row from logits [rows, vocab] at the last position; steps[i] = tokens row i made so far.

        inplace: the logits may be overwritten (the engine's own model output); otherwise they are copied.
        """
        if logits.shape[0] != len(self.rows):
            raise ValueError(f"{logits.shape[0]} rows of logits for {len(self.rows)} samplers")
        owned = logits.dtype != torch.float32 or logits.device.type != "cpu"
        logits = logits.float().cpu()  # (B, V)
        if not (inplace or owned):
            logits = logits.clone()
        if self.seen is None:
            self._build(logits.shape[1])
        if self.banned is not None:
            _update(logits, self.banned, lambda picked: torch.full_like(picked, _NEG_INF))
        early = [i for i, (s, m) in enumerate(zip(steps, self.min_new)) if s < m]
        if early and self.stop:
            rows, stops = torch.tensor(early)[:, None], self._index("stop", self.stop)[None, :]  # (E, 1), (1, n_stop)
            logits[rows, stops] = _NEG_INF
        if self.any_penalty and self.seen.shape[1]:
            penalty = self.penalty
            _update(logits, self.seen, lambda picked: torch.where(picked > 0, picked / penalty, picked * penalty))

        chosen = torch.empty(len(self.rows), dtype=torch.long)  # (B,)
        if self.greedy:
            if not self.sampled:
                chosen = logits.argmax(dim=-1)  # (B,)
            else:
                g = self._index("greedy", self.greedy)
                chosen[g] = logits.index_select(0, g).argmax(dim=-1)  # (B - S,)
        if self.sampled:
            if self.greedy:
                s = self._index("sampled", self.sampled)
                chosen[s] = self._draw(logits.index_select(0, s))  # (S,)
            else:
                chosen = self._draw(logits)  # (B,)
        seen = self.seen
        if seen.shape[1] and bool((seen[:, 0] < 0).any()):  # a row that had seen nothing has now
            seen = torch.where(seen < 0, chosen[:, None], seen)  # (B, N)
        self.seen = torch.cat([seen, chosen[:, None]], dim=1)  # (B, N + 1)
        return chosen.tolist()

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p and the draw for the sampled rows (logits [S, V])."""
        vocab = logits.shape[1]
        logits = logits.div_(self.temperature)  # (S, V)
        ks = [k if 0 < k < vocab else vocab for k in self.top_k]
        k_max = max(ks)
        if k_max == vocab and not self.any_top_p:
            candidates, order = logits, None  # (S, V); plain sampling over the whole vocabulary
        else:
            candidates, order = torch.topk(logits, k_max, dim=-1)  # (S, K) each; sorted, largest first
            if min(ks) < k_max:  # rows with a smaller top-k drop their tail
                rank = torch.arange(k_max)[None, :]  # (1, K)
                candidates = candidates.masked_fill(rank >= torch.tensor(ks)[:, None], _NEG_INF)  # (S, K)
            if self.any_top_p:
                probs = torch.softmax(candidates, dim=-1)  # (S, K)
                before = probs.cumsum(dim=-1)  # (S, K)
                # drop a token when the ones before it already reach top_p (the crossing one stays)
                drop = torch.zeros_like(before, dtype=torch.bool)  # (S, K)
                drop[:, 1:] = before[:, :-1] > self.top_p
                candidates = candidates.masked_fill(drop, _NEG_INF)  # (S, K)
        probs = torch.softmax(candidates, dim=-1)  # (S, K) or (S, V)
        picked = torch.empty(len(ks), dtype=torch.long)  # (S,) column index into candidates
        if self.unseeded:
            if not self.seeded:
                picked = torch.multinomial(probs, 1).squeeze(1)  # (S,)
            else:
                u = self._index("unseeded", self.unseeded)
                picked[u] = torch.multinomial(probs.index_select(0, u), 1).squeeze(1)
        for j in self.seeded:
            picked[j] = torch.multinomial(probs[j], 1, generator=self.rows[self.sampled[j]].generator)[0]
        if order is None:
            return picked
        return order.gather(1, picked[:, None]).squeeze(1)  # (S,) token ids


def _update(logits: torch.Tensor, index: torch.Tensor, change) -> None:
    """logits[i, index[i, j]] = change(that value), in place; rows of index that are -1 change nothing.

    A row of index is either all real ids or all -1 (see `_padded`), so the clamped -1s
    of a row only ever write back the value they read.
    """
    safe = index.clamp(min=0)  # (B, N)
    picked = logits.gather(1, safe)  # (B, N)
    changed = change(picked)  # (B, N)
    if bool((index[:, :1] < 0).any()):
        changed = torch.where(index < 0, picked, changed)
    logits.scatter_(1, safe, changed)  # (B, V)


def _padded(rows: list[list[int]]) -> torch.Tensor:
    """[len(rows), longest] ids; a short row repeats its first id (-1 for an empty row)."""
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [r[0] if r else -1] * (width - len(r)) for r in rows],
                        dtype=torch.long).reshape(len(rows), width)  # (B, N)


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a over rows of b, the narrower padded with its first column (or -1)."""
    width = max(a.shape[1], b.shape[1])

    def widen(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] == width:
            return t
        fill = t[:, :1] if t.shape[1] else torch.full((t.shape[0], 1), -1, dtype=t.dtype)
        return torch.cat([t, fill.expand(t.shape[0], width - t.shape[1])], dim=1)

    return torch.cat([widen(a), widen(b)])  # (B + B', N)


def banned_ids(loaded, params: SamplingParams) -> set[int]:
    """[UNK] & co. plus banned words that are a single token (with or without a leading space);
    `loaded` (a LoadedModel) caches each word's ids."""
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


def next_tokens(logits: torch.Tensor, rows: list[RowSampler], steps: list[int], stop_ids: set[int]) -> list[int]:
    """One token per row, each row with its own settings. logits: [batch, vocab] for the last position.

    Stateless helper for callers outside the engine: the rows' `seen` sets are read and
    updated, so calling it step after step penalizes repeats like the engine does.
    """
    sampler = BatchSampler(rows, stop_ids)
    chosen = sampler.sample(logits, steps)
    for row, token in zip(rows, chosen):
        row.seen.add(token)
    return chosen
