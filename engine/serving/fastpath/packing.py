"""A prefill's contexts packed end to end: the matrix products run on real tokens only, once.

Sixteen chats' contexts are rarely the same length (through the bot, 4 to 43 tokens for the
bench's messages); right-padding them to the longest ran the linear layers, nearly all of a
prefill's time, on 2.2× the real tokens, and nobody's first words come before the prefill
ends. So the tokens go through the matrix products as one (N, ·) run, and attention, which
needs each context's own causal window, runs context by context on that context's cache row
(a padded (U, W, ·) grid did 3× the attention work for a burst's mixed lengths).

Contexts that start the same way (a chat template's system prompt: every chat of a bot with
one persona) share that prefix: it runs once, as the run's first tokens, and every context's
own tokens attend to its keys (SmolLM2's template: ~30 of a short message's ~45 tokens).

Across prefills, `KeptPrefix` keeps the keys and values of the last prefilled context's first
tokens: a later prefill whose contexts all start with some of them (the same persona's system
prompt; the same chat's earlier turns) copies those columns instead of running the tokens (the
prefix is then not in the run at all). A lone SmolLM2 reply's prefill ran its ~30-token system
prompt every time before.

Shapes: U contexts, P the shared prefix (0: none), W the longest rest, N the tokens run, T keys,
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


class KeptPrefix:
    """The keys and values of the last prefilled context's first tokens (at most LIMIT), kept for the next
    prefill (`match`); the decoder that keeps it belongs to one model, so a swap starts a new one."""

    LIMIT = 64  # tokens kept: a system prompt and a turn or two (SmolLM2-135M int8: 1.5 MB; GPT-2 124M fp32: 4.7 MB)

    def __init__(self):
        self.tokens: list[int] = []
        self.kv: torch.Tensor | None = None  # (L, 2, K, T, D), the cache's dtype
        self.hits = 0  # prefills that reused it (tests, the bench)

    def match(self, contexts: list[list[int]]) -> int:
        """Tokens every context starts with that are kept, leaving each a token of its own (0 below SHARE_MIN)."""
        if not self.tokens:
            return 0
        n = common_prefix([self.tokens + [-1]] + contexts)
        return n if n >= SHARE_MIN else 0

    def keep(self, context: list[int], buffer: torch.Tensor, row: int) -> None:
        """Keep `context`'s first tokens from cache `buffer` (L, 2, Bcap, K, Tcap, D), row `row`, just prefilled."""
        n = min(len(context), self.LIMIT)
        self.kv = buffer[:, :, row, :, :n].clone()
        self.tokens = list(context[:n])


class Packed:
    def __init__(self, contexts: list[list[int]], kept: KeptPrefix | None = None, reuse: int = 0):
        """reuse: the first `reuse` tokens of every context are `kept`'s (KeptPrefix.match): not run, copied."""
        self.kept = kept if reuse else None
        self.prefix = reuse or (common_prefix(contexts) if len(contexts) > 1 else 0)
        if self.prefix < SHARE_MIN:
            self.prefix = 0
        run = 0 if self.kept is not None else self.prefix  # prefix tokens in the run
        rests = [c[self.prefix:] for c in contexts]
        self.lengths = [len(c) for c in rests]
        self.rows, self.width, self.run_prefix = len(contexts), max(self.lengths), run
        self.ids = torch.tensor(contexts[0][:run] + [t for c in rests for t in c], dtype=torch.long)  # (N,)
        self.positions = torch.cat([torch.arange(run)] +
                                   [torch.arange(self.prefix, self.prefix + n) for n in self.lengths])  # (N,)
        self.last = run + torch.tensor(list(itertools.accumulate(self.lengths))) - 1  # (U,) each context's last token
        self._masks: dict[tuple, torch.Tensor] = {}  # attention masks by (tokens, keys before them, query heads per key head)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_kv: tuple, first: int,
               scale: float | None = None, layer: int = 0) -> torch.Tensor:
        """Causal attention of the run (q: (N, H, D), k and v: (N, K, D)); each context's keys and values
        go into cache rows first … first+U-1 (the prefix's into every row: run, or copied from the kept
        prefix's `layer`). Returns (N, H, D).

        Attention runs context by context on the cache rows just written, with each key/value
        head's query heads stacked as its query rows (no repeated keys): on the padded grid it
        cost 3× the work for a burst's mixed lengths (16 contexts of 8–39 tokens: 2.3 ms a layer
        against 0.9 ms), and one SDPA call per context keeps a long context memory-efficient.
        """
        k_buf, v_buf = cache_kv  # (Bcap, K, Tcap, D)
        P, U = self.prefix, self.rows
        N, H, D = q.shape
        K = k.shape[1]
        G = H // K
        rows = q.reshape(N, K, G, D).transpose(0, 1).contiguous()  # (K, N, G, D): a context's rows are a view
        out = q.new_empty(N, K, G, D)
        if P and self.kept is not None:
            k_buf[first:first + U, :, :P] = self.kept.kv[layer, 0, :, :P]
            v_buf[first:first + U, :, :P] = self.kept.kv[layer, 1, :, :P]
        elif P:
            k_buf[first:first + U, :, :P] = k[:P].transpose(0, 1)
            v_buf[first:first + U, :, :P] = v[:P].transpose(0, 1)
            _attend(rows, out, 0, P, k_buf[first, :, :P], v_buf[first, :, :P], self._mask(P, 0, G), scale)
        start = self.run_prefix
        for row, n in enumerate(self.lengths):
            k_buf[first + row, :, P:P + n] = k[start:start + n].transpose(0, 1)
            v_buf[first + row, :, P:P + n] = v[start:start + n].transpose(0, 1)
            _attend(rows, out, start, n, k_buf[first + row, :, :P + n], v_buf[first + row, :, :P + n],
                    self._mask(n, P, G), scale)
            start += n
        return out.view(N, H, D)

    def _mask(self, n: int, before: int, groups: int) -> torch.Tensor | None:
        """(n·groups, before+n): n tokens (each repeated for its query heads) see the `before` keys and their
        own ≤ themselves; None = plain causal."""
        if not before and groups == 1:
            return None
        key = (n, before, groups)
        if key not in self._masks:
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            self._masks[key] = torch.cat([torch.ones(n, before, dtype=torch.bool), causal], 1).repeat_interleave(groups, 0)
        return self._masks[key]


def _attend(rows: torch.Tensor, out: torch.Tensor, start: int, n: int, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None, scale: float | None) -> None:
    """Tokens start … start+n-1 of `rows` (K, N, G, D) against their keys and values (K, T, D), into `out`
    (N, K, G, D). Key/value head kv's query rows are (position, query head) pairs, i·G + g: a view, no copy
    of the queries and no repeated keys. mask (n·G, T); None: plain causal (T = n, G = 1)."""
    K, _, G, D = rows.shape
    q = rows[:, start:start + n].reshape(1, K, n * G, D)
    if k.dtype != q.dtype:  # a float16 cache (beside int8 weights): this context's keys and values in float32, which
        k, v = k.to(q.dtype), v.to(q.dtype)  # torch's SDPA runs ~2x faster than float16 on a CPU without float16 arithmetic
    a = F.scaled_dot_product_attention(q, k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale)
    out[start:start + n] = a.view(K, n, G, D).transpose(0, 1)
