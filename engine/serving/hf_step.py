"""The engine's decoder for any transformers causal LM: its own forward and KV cache.

The batcher's model seam (see engine.serving.fastpath for the contract): a prefill of the
new rows' contexts (left-padded, one pass, logits of the last position only where the model
allows), one decode step for every running row, and the batch surgery on transformers' KV
cache (engine.serving.kvcache: merge, select, a cache that grows in place).

Shapes in comments: B rows, T columns of the mask and KV cache, U distinct contexts in one
prefill, V vocabulary.
"""
from __future__ import annotations

import inspect

import torch

from engine.serving import kvcache


def _forward_kwargs(model) -> str:
    """transformers 5 calls the cache argument `cache`; 4.x called it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _takes_logits_to_keep(model) -> bool:
    """Whether forward() can skip the output projection for all but the last position."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class HFState:
    """The running rows' transformers KV cache, attention mask and next positions."""

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, growing: bool):
        self.cache = cache            # the model's KV cache, (B, H, T, D) keys and values per layer
        self.mask = mask              # (B, T) attention mask (0 = left padding)
        self.positions = positions    # (B,) position id of the next token
        self.growing = growing        # the cache is kvcache.GrowingLayer's (decode passes a 4D mask)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    def merge(self, other: "HFState") -> None:
        """Append `other`'s rows (left-padding whichever cache is shorter)."""
        if self.growing != other.growing:
            raise RuntimeError("cannot merge a growing KV cache with a concatenating one")
        self.mask = kvcache.merge(self.cache, self.mask, other.cache, other.mask)  # (B + B', T)
        self.positions = torch.cat([self.positions, other.positions])  # (B + B',)

    def select(self, keep: list[int]) -> None:
        """Keep rows `keep` only (and drop padding columns no row needs any more)."""
        self.mask = kvcache.select(self.cache, self.mask, keep)  # (B', T')
        self.positions = self.positions.index_select(0, torch.tensor(keep, device=self.positions.device))  # (B',)


class HFDecoder:
    name = "transformers"

    def __init__(self, model, pad_id: int = 0, grow_cache: bool = True):
        self.model = model
        self.pad_id = pad_id
        self.grow_cache = grow_cache  # KV cache with spare room (kvcache.GrowingLayer) where the model allows it
        self.cache_kwarg = _forward_kwargs(model)
        self.keeps_last_logits = _takes_logits_to_keep(model)
        self.device = next(model.parameters()).device

    def _cache_of(self, out):
        """The KV cache a forward pass returned (`cache` in transformers 5, `past_key_values` before)."""
        cache = getattr(out, self.cache_kwarg, None)
        return cache if cache is not None else out.past_key_values

    def prefill(self, contexts: list[list[int]], expand: list[int], room: int = 0,
                joins: HFState | None = None) -> tuple[HFState, torch.Tensor]:
        """The U distinct contexts in one left-padded pass; rows = expand. Returns (state, (B, V) logits).

        room (tokens still to generate) is not used: transformers' cache grows as it goes.
        """
        width = max(len(c) for c in contexts)
        pad, device = self.pad_id, self.device
        ids = torch.tensor([[pad] * (width - len(c)) + list(c) for c in contexts], device=device)  # (U, T)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)  # (U, T)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (U, T)
        extra = {"logits_to_keep": 1} if self.keeps_last_logits else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **extra)
        cache = self._cache_of(out)
        logits = out.logits[:, -1, :]  # (U, V)
        if len(contexts) < len(expand):  # U unique contexts → B requests
            mask = kvcache.select(cache, mask, expand)  # (B, T)
            logits = logits.index_select(0, torch.tensor(expand, device=logits.device))  # (B, V)
        growing = self.grow_cache and kvcache.can_grow(cache, self.model)
        if growing:
            kvcache.use_growing(cache)
        return HFState(cache, mask, mask.sum(-1), growing), logits

    def release(self, state: HFState) -> None:
        """The batch is done; transformers' cache is simply dropped."""

    def decode(self, state: HFState, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row at its next position; returns (B, V) logits."""
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.rows, 1)], dim=1)  # (B, T + 1)
        attention_mask = state.mask
        if state.growing:  # write into the cache's spare room; the 4D mask hides what is not filled yet
            kvcache.reserve(state.cache, 1)
            attention_mask = kvcache.mask_4d(state.cache, state.mask)  # (B, 1, 1, capacity)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=state.positions[:, None],
            use_cache=True, **{self.cache_kwarg: state.cache},
        )  # out.logits: (B, 1, V)
        state.cache = self._cache_of(out)
        state.positions = state.positions + 1  # (B,)
        return out.logits[:, -1, :]
