"""Batch surgery on a Hugging Face KV cache: pad, merge, select, trim.

Continuous batching keeps one cache for all running requests. A request that joins is
prefilled on its own, then its cache is left-padded to the batch's length and stacked
onto it; a request that ends is dropped from it. Padding columns are masked out by the
attention mask, so their (zero) keys and values never matter.
"""
from __future__ import annotations

import torch


def layers(cache) -> list:
    """The per-layer objects holding .keys/.values (transformers 5) or a shim for 4.x."""
    if hasattr(cache, "layers"):
        return list(cache.layers)
    return [_LegacyLayer(cache, i) for i in range(len(cache.key_cache))]


class _LegacyLayer:
    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    keys = property(lambda s: s.cache.key_cache[s.i], lambda s, v: s.cache.key_cache.__setitem__(s.i, v))
    values = property(lambda s: s.cache.value_cache[s.i], lambda s, v: s.cache.value_cache.__setitem__(s.i, v))


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[2] = n
    return torch.cat([t.new_zeros(shape), t], dim=2)


def merge(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Stack `other` (new rows) under `cache` in place; return the merged attention mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    target = max(length, other_length)
    for mine, theirs in zip(layers(cache), layers(other)):
        mine.keys = torch.cat([_pad_left(mine.keys, target - length), _pad_left(theirs.keys, target - other_length)], 0)
        mine.values = torch.cat([_pad_left(mine.values, target - length), _pad_left(theirs.values, target - other_length)], 0)
    pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1) if n else m  # noqa: E731
    return torch.cat([pad(mask, target - length), pad(other_mask, target - other_length)], 0)


def select(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` (in place) and drop padding columns no row needs any more."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]
