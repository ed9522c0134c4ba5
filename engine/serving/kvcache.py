"""Batch surgery on a Hugging Face KV cache: pad, merge, select, trim.

Continuous batching keeps one cache for all running requests. A request that joins is
prefilled on its own, then its cache is left-padded to the batch's length and stacked
onto it; a request that ends is dropped from it. Padding columns are masked out by the
attention mask, so their (zero) keys and values never matter.

Shapes in comments: B rows, H attention heads, T cached positions, D head width; keys
and values are (B, H, T, D) per layer, the attention mask (B, T).
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
    return torch.cat([t.new_zeros(shape), t], dim=2)  # (B, H, n + T, D)


def merge(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Stack `other` (new rows) under `cache` in place; return the merged attention mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    target = max(length, other_length)
    for mine, theirs in zip(layers(cache), layers(other)):
        mine.keys = torch.cat([_pad_left(mine.keys, target - length),
                               _pad_left(theirs.keys, target - other_length)], 0)  # (B + B', H, T, D)
        mine.values = torch.cat([_pad_left(mine.values, target - length),
                                 _pad_left(theirs.values, target - other_length)], 0)  # (B + B', H, T, D)
    pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1) if n else m  # noqa: E731
    return torch.cat([pad(mask, target - length), pad(other_mask, target - other_length)], 0)  # (B + B', T)


def select(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only rows `keep` (in place) and drop padding columns no row needs any more."""
    index = torch.tensor(keep, device=mask.device)  # (B',)
    mask = mask.index_select(0, index)  # (B', T)
    used = mask.any(dim=0).nonzero()  # (columns some row attends to, 1)
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]  # (B', H, T - start, D)
        layer.values = layer.values.index_select(0, index)[:, :, start:]  # (B', H, T - start, D)
    return mask[:, start:]  # (B', T - start)


# --------------------------------------------------------------------------- a cache that grows in place
#
# A DynamicLayer concatenates each step's keys/values onto the whole cache: at batch 32 that
# is a fresh copy of every layer's cache per token (and the allocator keeps the garbage:
# RSS grew by ~0.9 GB at 32 chats). GrowingLayer writes each step into spare room at the
# end of a buffer and re-allocates only every `headroom` tokens (or when rows join/leave).
# Its update() hands attention the whole buffer, spare room included, so the caller must
# pass a 4D mask that hides the spare columns (`mask_4d`); the engine does that.

try:
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # transformers 4.x: no per-layer cache objects; the engine keeps the concatenating path
    _DynamicLayer = None


def _filled_view(name: str) -> property:
    """A GrowingLayer attribute that reads the filled part of buffer `name` and re-buffers on assignment."""
    def read(layer):
        buffer = getattr(layer, name)
        return None if buffer is None else buffer[:, :, :layer._filled[name]]

    def write(layer, tensor):
        layer._assign(name, tensor)

    return property(read, write)


if _DynamicLayer is not None:

    class GrowingLayer(_DynamicLayer):
        """A DynamicLayer whose keys/values live in buffers with spare room at the end."""

        headroom = 16

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            self._k = self._v = None
            self._filled = {"_k": 0, "_v": 0}  # keys and values are assigned one after the other
            super().__init__()
            if keys is not None:
                self.is_initialized = True
                self.device = keys.device
                self._rebuffer(keys, values)

        @property
        def n(self) -> int:
            """Filled columns."""
            return self._filled["_k"]

        # .keys/.values: the filled part (a view); assigning them re-buffers (merge/select/crop use that)
        keys = _filled_view("_k")
        values = _filled_view("_v")

        def _assign(self, name: str, tensor) -> None:
            if tensor is None or tensor.dim() != 4:  # reset() / lazy_initialization()
                setattr(self, name, None)
                self._filled[name] = 0
                return
            # (B, H, T + headroom, D)
            buffer = tensor.new_zeros(*tensor.shape[:2], tensor.shape[2] + self.headroom, tensor.shape[3])
            buffer[:, :, :tensor.shape[2]] = tensor
            setattr(self, name, buffer)
            self._filled[name] = tensor.shape[2]

        def _rebuffer(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            self._assign("_k", keys)
            self._assign("_v", values)

        @property
        def capacity(self) -> int:
            return 0 if self._k is None else self._k.shape[2]

        def reserve(self, tokens: int) -> None:
            """Make room for `tokens` more columns (re-allocating with headroom when short)."""
            if self._k is not None and self.n + tokens > self.capacity:
                self._rebuffer(self._k[:, :, :self.n], self._v[:, :, :self.n])

        def update(self, key_states, value_states, *args, **kwargs):
            if self._k is None:
                self.is_initialized = True
                self.device = key_states.device
                self._rebuffer(key_states, value_states)
                return self._k, self._v
            q = key_states.shape[2]
            self.reserve(q)
            n = self.n
            self._k[:, :, n:n + q] = key_states  # (B, H, q, D) into (B, H, capacity, D)
            self._v[:, :, n:n + q] = value_states
            self._filled["_k"] = self._filled["_v"] = n + q
            return self._k, self._v  # the whole buffer: the caller's 4D mask hides the spare columns

        def get_seq_length(self) -> int:
            return self.n

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.capacity, 0
else:  # pragma: no cover
    GrowingLayer = None


def can_grow(cache, model) -> bool:
    """Whether the engine may switch this cache to GrowingLayer: plain dynamic layers, sdpa attention."""
    if GrowingLayer is None or not hasattr(cache, "layers"):
        return False
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != "sdpa":
        return False
    return all(type(layer) in (_DynamicLayer, GrowingLayer) for layer in cache.layers)


def use_growing(cache) -> None:
    """Turn every layer of `cache` into a GrowingLayer holding the same keys/values.

    One layer at a time, so only one layer's old tensors are alive next to the new buffers.
    """
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, GrowingLayer):
            cache.layers[i] = GrowingLayer(layer.keys, layer.values)
            layer.keys = layer.values = None


def reserve(cache, tokens: int = 1) -> None:
    for layer in cache.layers:
        layer.reserve(tokens)


def mask_4d(cache, mask: torch.Tensor) -> torch.Tensor:
    """[rows, 1, 1, capacity] boolean attention mask: `mask`'s columns, spare room hidden.

    For one new token per row (decoding): `mask` must already include the new column.
    """
    capacity = cache.layers[0].capacity
    full = torch.zeros(mask.shape[0], 1, 1, capacity, dtype=torch.bool, device=mask.device)  # (B, 1, 1, capacity)
    full[:, 0, 0, :mask.shape[1]] = mask.bool()  # (B, T) into the first T columns
    return full
