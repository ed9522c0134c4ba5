"""A prefill's contexts packed end to end: the matrix products run on real tokens only.

Sixteen chats' contexts are rarely the same length (through the bot, 4 to 43 tokens for the
bench's messages); right-padding them to the longest ran the linear layers, nearly all of a
prefill's time, on 2.2× the real tokens, and nobody's first words come before the prefill
ends. So the tokens go through the matrix products as one (N, ·) run, and only attention,
which needs each context's own causal window, sees the padded (U, W, ·) grid.

Shapes: U contexts, W the longest, N their tokens together.
"""
from __future__ import annotations

import itertools

import torch


class Packed:
    def __init__(self, contexts: list[list[int]]):
        self.lengths = [len(c) for c in contexts]
        self.rows, self.width = len(contexts), max(self.lengths)
        self.ids = torch.tensor([t for c in contexts for t in c], dtype=torch.long)  # (N,)
        self.positions = torch.cat([torch.arange(n) for n in self.lengths])  # (N,) each token's position in its context
        self.dense = sum(self.lengths) == self.rows * self.width  # all the same length: packed is padded
        self.slots = None if self.dense else \
            torch.cat([torch.arange(n) + i * self.width for i, n in enumerate(self.lengths)])  # (N,) places in the grid
        self.last = torch.tensor(list(itertools.accumulate(self.lengths))) - 1  # (U,) each context's last token

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) → (U, W, ...), zeros after each context's end."""
        if self.dense:
            return x.reshape(self.rows, self.width, *x.shape[1:])
        grid = x.new_zeros(self.rows * self.width, *x.shape[1:])
        grid.index_copy_(0, self.slots, x)
        return grid.view(self.rows, self.width, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(U, W, ...) → (N, ...): the real tokens' rows."""
        flat = x.reshape(self.rows * self.width, *x.shape[2:])
        return flat if self.dense else flat.index_select(0, self.slots)
