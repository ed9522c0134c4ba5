"""Choosing the next token for every row of a batch, each row with its own settings.

GPT2-chitchat parity: temperature, top-k, top-p (nucleus), repetition penalty, plus
min/max new tokens, banned tokens and a per-request seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
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


class RowSampler:
    """The per-request state of sampling: settings, random generator, seen tokens."""

    def __init__(self, params: SamplingParams, context_ids: list[int], banned_ids: set[int]):
        self.params = params
        self.seen = set(context_ids)
        self.banned = sorted(banned_ids)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)


def _apply_penalty(logits: torch.Tensor, seen: set[int], penalty: float) -> None:
    if penalty == 1.0 or not seen:
        return
    idx = torch.tensor(sorted(seen), device=logits.device)
    picked = logits[idx]
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative > top_p
        drop[1:] = drop[:-1].clone()  # keep the token that crosses the threshold
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, rows: list[RowSampler], steps: list[int], stop_ids: set[int]) -> list[int]:
    """One token per row. logits: [batch, vocab] for the last position."""
    logits = logits.float().cpu()
    chosen = []
    stop = sorted(stop_ids)
    for i, row in enumerate(rows):
        p = row.params
        row_logits = logits[i].clone()
        if row.banned:
            row_logits[row.banned] = float("-inf")
        if steps[i] < p.min_new_tokens:
            row_logits[stop] = float("-inf")
        _apply_penalty(row_logits, row.seen, p.repetition_penalty)
        if not p.do_sample:
            token = int(torch.argmax(row_logits))
        else:
            row_logits = _filter_top_k_top_p(row_logits / max(p.temperature, 1e-5), p.top_k, p.top_p)
            probs = torch.softmax(row_logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        row.seen.add(token)
        chosen.append(token)
    return chosen
