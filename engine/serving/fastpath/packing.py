"""A prefill's contexts packed end to end: the matrix products run on real tokens only, once.

Sixteen chats' contexts are rarely the same length (through the bot, 4 to 43 tokens for the
bench's messages); right-padding them to the longest ran the linear layers, nearly all of a
prefill's time, on 2.2× the real tokens, and nobody's first words come before the prefill
ends. So the tokens go through the matrix products as one (N, ·) run, and only attention,
which needs each context's own causal window, sees the padded (U, W, ·) grid.

Contexts that start the same way (a chat template's system prompt: every chat of a bot with
one persona) share that prefix: it runs once, as the run's first tokens, and every context's
own tokens attend to its keys (SmolLM2's template: ~30 of a short message's ~45 tokens).

Shapes: U contexts, P the shared prefix (0: none), W the longest rest, N the tokens run,
H query heads, K key/value heads, D head width.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

SHARE_MIN = 8   # a common prefix shorter than this is run with each context (not worth the second attention call)


def common_prefix(contexts: list[list[int]]) -> int:
    """Tokens every context starts with, leaving each at least one of its own."""
    shortest = min(len(c) for c in contexts)
    n = 0
    for column in zip(*contexts):
        if n >= shortest - 1 or any(t != column[0] for t in column):
            break
        n += 1
    return n


class Packed:
    def __init__(self, contexts: list[list[int]]):
        self.prefix = common_prefix(contexts) if len(contexts) > 1 else 0
        if self.prefix < SHARE_MIN:
            self.prefix = 0
        rests = [c[self.prefix:] for c in contexts]
        self.lengths = [len(c) for c in rests]
        self.rows, self.width = len(contexts), max(self.lengths)
        self.ids = torch.tensor(contexts[0][:self.prefix] + [t for c in rests for t in c], dtype=torch.long)  # (N,)
        self.positions = torch.cat([torch.arange(self.prefix)] +
                                   [torch.arange(self.prefix, self.prefix + n) for n in self.lengths])  # (N,)
        self.dense = sum(self.lengths) == self.rows * self.width  # all the same length: packed is padded
        self.slots = None if self.dense else \
            torch.cat([torch.arange(n) + i * self.width for i, n in enumerate(self.lengths)])  # (N - P,) places in the grid
        self.last = self.prefix + torch.tensor(list(itertools.accumulate(self.lengths))) - 1  # (U,) each context's last token
        self.mask = None if not self.prefix else torch.cat(  # rest token i sees the prefix and rest tokens ≤ i
            [torch.ones(self.width, self.prefix, dtype=torch.bool),
             torch.ones(self.width, self.width, dtype=torch.bool).tril()], dim=1)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """The rests' rows of (N, ...) as (U, W, ...), zeros after each context's end."""
        x = x[self.prefix:]
        if self.dense:
            return x.reshape(self.rows, self.width, *x.shape[1:])
        grid = x.new_zeros(self.rows * self.width, *x.shape[1:])
        grid.index_copy_(0, self.slots, x)
        return grid.view(self.rows, self.width, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(U, W, ...) → (N - P, ...): the rests' real tokens."""
        flat = x.reshape(self.rows * self.width, *x.shape[2:])
        return flat if self.dense else flat.index_select(0, self.slots)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_kv: tuple, first: int,
               scale: float | None = None) -> torch.Tensor:
        """Causal attention of the run (q: (N, H, D), k and v: (N, K, D)); each context's keys and values
        go into cache rows first … first+U-1 (the prefix's into every row). Returns (N, H, D)."""
        k_buf, v_buf = cache_kv  # (Bcap, K, Tcap, D)
        P, U, W = self.prefix, self.rows, self.width
        groups = q.shape[1] // k.shape[1]
        qs, ks, vs = (self.pad(t).transpose(1, 2) for t in (q, k, v))  # (U, ·, W, D)
        k_buf[first:first + U, :, P:P + W] = ks
        v_buf[first:first + U, :, P:P + W] = vs
        out = []
        if P:
            kp, vp = k[:P].transpose(0, 1), v[:P].transpose(0, 1)  # (K, P, D)
            k_buf[first:first + U, :, :P] = kp
            v_buf[first:first + U, :, :P] = vp
            ks, vs = torch.cat([kp.expand(U, -1, -1, -1), ks], 2), torch.cat([vp.expand(U, -1, -1, -1), vs], 2)
            kp, vp = _repeat(kp, groups, 0), _repeat(vp, groups, 0)
            out.append(F.scaled_dot_product_attention(q[:P].transpose(0, 1), kp, vp, is_causal=True, scale=scale)
                       .transpose(0, 1))  # (P, H, D)
        ks, vs = _repeat(ks, groups, 1), _repeat(vs, groups, 1)
        a = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=self.mask, is_causal=self.mask is None, scale=scale)
        out.append(self.unpad(a.transpose(1, 2)))  # (N - P, H, D); padding sits after the text
        return torch.cat(out) if P else out[0]


def _repeat(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Key/value heads repeated for their query heads (grouped-query attention)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)
