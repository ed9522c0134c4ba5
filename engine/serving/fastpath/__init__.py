"""The engine's fast decode paths (GPT-2 and Llama families), and how the engine picks a decoder.

A *decoder* is what the batcher calls at its one model seam: `prefill(contexts)` gives a
state for the new rows and their last-token logits, `decode(state, tokens)` one step for
every row; a state follows the batch with `merge(other)` and `select(keep)`. Two exist:

- `FastDecoder` (here): a hand-written step on a static KV cache — fastpath.gpt2.GPT2Step
  for GPT-2, fastpath.llama.LlamaStep for Llama, SmolLM2, Qwen2 and Mistral;
- `HFDecoder` (engine.serving.hf_step): transformers' own forward, for every other model.

`pick_decoder(model, mode)`: mode "auto" takes the first fast path whose `supports`
accepts the model, "off" always takes transformers' forward (`[engine] fast_path`).
"""
from __future__ import annotations

import logging

import torch

from engine.lean import is_lean
from engine.serving.fastpath.cache import SpareBuffer, StaticKV
from engine.serving.fastpath.packing import SHARE_MIN, KeptPrefix, common_prefix
from engine.serving.fastpath.gpt2 import GPT2Step
from engine.serving.fastpath.llama import LlamaStep

log = logging.getLogger(__name__)

FAST_PATH_MODES = ("auto", "off")
PREFILL_CHUNK_TOKENS = 384  # a burst's contexts are prefilled a group of about this many tokens at a time
STEPS = (GPT2Step, LlamaStep)  # the fast paths, tried in this order


class FastState:
    """The running rows' KV cache on the fast path."""

    def __init__(self, cache: StaticKV):
        self.cache = cache

    @property
    def rows(self) -> int:
        return self.cache.rows

    def merge(self, other: "FastState") -> None:
        self.cache.merge(other.cache)

    def select(self, keep: list[int]) -> None:
        self.cache.select(keep)


class FastDecoder:
    name = "fast"

    def __init__(self, model, step_class=GPT2Step):
        self.step = step_class(model)
        self.family = step_class.__name__.removesuffix("Step").lower()
        self.spare = SpareBuffer()  # one KV buffer kept between batches (fastpath.cache)
        self.kept = KeptPrefix()  # the last context's first keys and values (a persona's system prompt runs once)

    def prefill(self, contexts: list[list[int]], expand: list[int], room: int = 0,
                joins: FastState | None = None) -> tuple[FastState, torch.Tensor]:
        """Prefill the U distinct `contexts`; rows = expand (index into contexts per request).

        room: tokens the rows may still generate (their cache columns are reserved now).
        joins: the running batch these rows will be merged into; the new buffer is made big enough for
        both, so the merge moves rows in place (a third buffer beside both was a 16-chat burst's RSS
        peak: +63 MB on SmolLM2-135M int8 when one running chat's columns outnumbered the burst's).
        Returns the state of len(expand) rows and their logits (B, V).
        """
        cache = self.step.new_cache()
        cache.spare = self.spare
        if joins is not None and joins.rows:  # rows and columns the merged batch needs, where its buffer lacks them
            rows, columns = joins.rows + len(expand), max(joins.cache.capacity()[1], max(map(len, contexts)) + room)
            have_rows, have_columns = joins.cache.capacity()
            if have_rows < rows or have_columns < columns:
                cache.reserve(rows, columns)
        cache.add_rows([len(c) for c in contexts], room)
        first, parts = cache.rows - len(contexts), []
        for group in prefill_groups(contexts, PREFILL_CHUNK_TOKENS):
            reuse = self.kept.match(group)
            parts.append(self.step.prefill(group, cache, first, self.kept, reuse))
            self.kept.hits += bool(reuse)
            self.kept.keep(group[0], cache.buffer, first)  # the newest: the next chat's persona, this chat's next turn
            first += len(group)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)  # (U, V)
        if len(expand) != len(contexts) or expand != list(range(len(expand))):
            cache.select(expand)
            logits = logits.index_select(0, torch.tensor(expand, dtype=torch.long))  # (B, V)
        return FastState(cache), logits

    def decode(self, state: FastState, tokens: torch.Tensor) -> torch.Tensor:
        return self.step.decode(tokens, state.cache)

    def release(self, state: FastState) -> None:
        """The batch is done: its KV buffer is kept for the next one."""
        state.cache.release()


def prefill_groups(contexts: list[list[int]], budget: int) -> list[list[list[int]]]:
    """`contexts` in order, in groups of at most `budget` tokens run (a longer context alone).

    Why: a prefill's activations grow with its tokens (a 16-chat SmolLM2 burst's ~1,000 packed
    tokens: ~25 MB of them at once, all resident at the peak); groups of ~384 tokens hold a third
    of that and keep the matrix products wide enough to run at full speed (AMX, MKL). A prefix
    every context shares (a chat template's system prompt) runs once per group (packing.Packed), so
    it counts once: 15 chats of 44 tokens sharing 24 ran as two groups (348 tokens), now one (324).
    """
    shared = common_prefix(contexts) if len(contexts) > 1 else 0
    shared = shared if shared >= SHARE_MIN else 0
    groups, size = [[]], shared
    for context in contexts:
        if groups[-1] and size + len(context) - shared > budget:
            groups.append([])
            size = shared
        groups[-1].append(context)
        size += len(context) - shared
    return groups


def pick_decoder(model, mode: str = "auto", *, pad_id: int = 0, grow_cache: bool = True):
    """The fast path where it can serve `model` (and mode allows), else transformers' forward.
    A lean-loaded model (engine.lean) has no forward of its own: the fast path or a clear error."""
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"fast_path must be one of {', '.join(FAST_PATH_MODES)}, not {mode!r}")
    reasons = []
    if mode == "auto":
        for step_class in STEPS:
            why_not = step_class.supports(model)
            if not why_not:
                return FastDecoder(model, step_class)
            reasons.append(why_not)
    if is_lean(model):
        raise RuntimeError(f"this model was loaded without transformers, and only the fast path can serve it "
                           f"({'; '.join(reasons) or 'fast_path is off'}): load it with transformers")
    if reasons:
        log.info("fast decode path not used (%s): serving with transformers' forward", "; ".join(reasons))
    from engine.serving.hf_step import HFDecoder  # imports transformers: only where it serves

    return HFDecoder(model, pad_id=pad_id, grow_cache=grow_cache)
