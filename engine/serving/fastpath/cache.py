"""A static KV cache with one length per row, for the fast decode path.

One buffer holds every layer's keys and values, (layers, 2, row capacity, H, column
capacity, D). Row i's tokens sit in columns 0 … lengths[i]-1 (no left padding), so rows of
different lengths share the buffer without padding columns, and a decode step writes one
column per row in place (at each row's own length). Attention reads columns
0 … max(lengths) and a boolean mask hides each row's columns past its own length.

The buffer grows (rows or columns, with headroom) only when it is full, so steady decoding
allocates nothing for the cache. Rows that leave are compacted by moving only the rows
behind them; rows that join are copied in after the running ones. New buffers are zeroed
so columns nobody wrote hold finite numbers (a masked column still multiplies its value by 0).

Shapes in comments: B rows, L layers, H heads, T columns, D head width.
"""
from __future__ import annotations

import math

import torch

from engine.serving.fastpath.kernels import fits  # importing it registers torch.ops.mynah.decode_attention

COLUMN_HEADROOM = 32   # spare columns allocated when the buffer grows (one re-allocation per 32 tokens)
ROW_GRANULE = 4        # row capacity grows in multiples of this


def cache_dtype(projection, family: str, head_dim: int) -> torch.dtype:
    """The fast path's KV cache dtype for layers of `projection`'s kind (fastpath.linear.Projection):
    float16 beside int8 weights, float32 beside fp32 ones (their tokens are exactly transformers').

    A float16 cache is half the memory and half the bytes each decode step reads: SmolLM2-135M's
    fp32 cache is 46 KB a token, ~0.7 GB for 16 full chat-template windows; GPT-2 124M's cache was
    ~88 MB of the bot's ~540 MB peak in the bench's 16-chat burst. Agreement measured on the real
    SmolLM2 int8 (docs/BENCHMARKS.md, issue 23, eighth pass): 88.8 % with a float16 cache against
    89.6 % with float32 (bfloat16: 77.2 %, too coarse for attention logits), as llama.cpp's default
    cache and CTranslate2's int8_float16 do.

    Decode steps read it with the float16 kernel (fastpath.kernels) where it runs; without it, torch's
    SDPA on float16 runs ~2x slower than on float32 on a CPU without float16 arithmetic, so then only
    Llama-family models (long chat-template contexts: the memory matters most) keep float16, and
    GPT-2 (short dialogue contexts; a float16 16-chat step measured ~25 % slower) float32.
    """
    from engine.serving.fastpath.linear import INT8, NATIVE_INT8

    if projection.kind not in (INT8, NATIVE_INT8):
        return torch.float32
    return torch.float16 if family == "llama" or fits(head_dim) else torch.float32


def kernel_reads(dtype: torch.dtype, head_dim: int) -> bool:
    """True when decode steps read a cache of `dtype` with the float16 kernel (fastpath.kernels)."""
    return dtype == torch.float16 and fits(head_dim)


class SpareBuffer:
    """The last KV buffer a batch let go of, kept for the next one: memory the process already has.

    The engine hands freed memory back to the OS when it goes idle, so each burst's new buffer
    was zeroed page by page inside its prefill: ~24,000 page faults for 16 chats on GPT-2 124M
    int8, a 16-context prefill of 0.14 s against 0.11 s on memory already held (SmolLM2-135M's
    shape: 0.20 s against 0.18 s; docs/BENCHMARKS.md). One spare, the largest a finished batch
    let go of, bounds what is kept to one burst's cache, which the peak held anyway; a buffer a
    running batch outgrows is freed (kept as a spare beside the batch, it added ~19 MB to the bot's
    peak in a 16-chat burst).
    """

    def __init__(self):
        self.flat: torch.Tensor | None = None  # (capacity,) the whole storage of a released buffer

    def take(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed tensor of `shape`: the spare's memory when it is large enough, else a new one (the spare
        is let go first: at most one buffer is kept beyond those in use)."""
        need, flat = math.prod(shape), self.flat
        self.flat = None  # one holder at a time; too small a spare is let go before a new buffer is made
        if flat is None or flat.dtype != dtype or flat.numel() < need:
            del flat
            return torch.zeros(shape, dtype=dtype)
        return flat[:need].view(shape).zero_()

    def give(self, buffer: torch.Tensor | None) -> None:
        """Keep `buffer`'s storage if it is larger than the spare (the caller no longer uses it)."""
        if buffer is None:
            return
        storage = buffer.untyped_storage()
        size = storage.nbytes() // buffer.element_size()
        if self.flat is None or size > self.flat.numel():
            self.flat = torch.empty(0, dtype=buffer.dtype).set_(storage, 0, (size,))


class StaticKV:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        self.shape = (layers, heads, head_dim)
        self.dtype = dtype
        self.spare = SpareBuffer()  # where buffers this cache lets go of go, and new ones come from (shared: FastDecoder)
        self.buffer: torch.Tensor | None = None  # (L, 2, Bcap, H, Tcap, D)
        self.lengths: list[int] = []              # cached tokens per row
        self._lengths_t: torch.Tensor | None = None

    # ---- sizes ---------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.buffer is None else (self.buffer.shape[2], self.buffer.shape[4])

    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def _reserve(self, rows: int, columns: int, headroom: int = COLUMN_HEADROOM) -> None:
        """Room for `rows` rows of `columns` columns (plus `headroom` when it grows); keeps what is cached."""
        have_rows, have_columns = self.capacity()
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(have_rows, -(-rows // ROW_GRANULE) * ROW_GRANULE)
        new_columns = max(have_columns, columns + headroom) if columns > have_columns else have_columns
        layers, heads, head_dim = self.shape
        buffer = self.spare.take((layers, 2, new_rows, heads, new_columns, head_dim), self.dtype)
        if self.buffer is not None and self.rows:
            used = max(self.lengths)
            buffer[:, :, :self.rows, :, :used] = self.buffer[:, :, :self.rows, :, :used]
        self.buffer = buffer  # the outgrown one is freed, not kept: the spare is what a finished batch lets go of

    def reserve(self, rows: int, columns: int) -> None:
        """Room for `rows` rows of `columns` columns now (no headroom), before any row is added."""
        self._reserve(rows, columns, 0)

    def release(self) -> None:
        """Done with every row: the buffer goes to the spare for the next batch."""
        self.spare.give(self.buffer)
        self.buffer, self.lengths, self._lengths_t = None, [], None

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's keys and values buffers, (Bcap, H, Tcap, D) views."""
        return self.buffer[i, 0], self.buffer[i, 1]

    def lengths_tensor(self) -> torch.Tensor:
        if self._lengths_t is None:
            self._lengths_t = torch.tensor(self.lengths, dtype=torch.long)
        return self._lengths_t

    # ---- rows joining, leaving ---------------------------------------------------------
    def add_rows(self, lengths: list[int], room: int = 0) -> None:
        """Append rows that a prefill is about to fill with `lengths` tokens each.

        room: columns to reserve beyond the longest (the tokens the rows will generate), so
        decoding them never re-allocates the buffer (a re-allocation holds two copies); with
        room reserved no further headroom is added (it would only be memory nobody writes).
        """
        self._reserve(self.rows + len(lengths), max(self.lengths + list(lengths)) + room, 0 if room else COLUMN_HEADROOM)
        self.lengths = self.lengths + list(lengths)
        self._lengths_t = None

    def select(self, index: list[int]) -> None:
        """Keep rows `index` in that order (repeats allowed: a shared prefill fanned out).

        Rows leaving (an increasing `index`) move the rest up row by row in place: one gather of
        every moving row held a copy of them all (+66 MB for 15 GPT-2 rows at ~100 columns, the
        bot's RSS peak in a 16-chat burst).
        """
        if index == list(range(len(index))):  # a prefix of the rows: nothing moves
            self.lengths = self.lengths[:len(index)]
            self._lengths_t = None
            return
        lengths = [self.lengths[i] for i in index]
        self._reserve(len(index), max(lengths, default=0))
        start = next(j for j, i in enumerate(index) if i != j)  # rows before this one stay where they are
        used = max(lengths[start:], default=0)
        if used and all(a < b for a, b in zip(index, index[1:])):  # rows leaving: the rest move up, one at a time
            for j in range(start, len(index)):  # each source row lies below every row written before it
                self.buffer[:, :, j, :, :lengths[j]] = self.buffer[:, :, index[j], :, :lengths[j]]
        elif used:
            src = torch.tensor(index[start:], dtype=torch.long)
            self.buffer[:, :, start:len(index), :, :used] = self.buffer[:, :, src, :, :used]  # gather copies first
        self.lengths = lengths
        self._lengths_t = None

    def merge(self, other: "StaticKV") -> None:
        """Append `other`'s rows after these.

        Where the rows do not all fit this buffer but fit `other`'s (a burst joining one running
        chat; the prefill made `other`'s big enough, FastDecoder.prefill `joins`), `other`'s buffer
        is used instead of allocating a third one: a new buffer beside both would hold the cache
        about twice at the peak.
        """
        if not other.rows:
            return
        first, total = self.rows, self.rows + other.rows
        fits_here = total <= self.capacity()[0] and other.capacity()[1] <= self.capacity()[1]
        if self.rows and not fits_here and total <= other.capacity()[0] and self.capacity()[1] <= other.capacity()[1]:
            self._merge_into(other)
            return
        self._reserve(total, max(max(self.lengths + other.lengths), other.capacity()[1]), 0)
        used = max(other.lengths)
        self.buffer[:, :, first:first + other.rows, :, :used] = other.buffer[:, :, :other.rows, :, :used]
        self.lengths = self.lengths + other.lengths
        self._lengths_t = None
        other.buffer, other.lengths, other._lengths_t = None, [], None  # freed: see _merge_into

    def _merge_into(self, other: "StaticKV") -> None:
        """Move `other`'s rows behind where these go (in place, row by row: no copy of them all), copy
        these in front, and keep its buffer."""
        first, buffer = self.rows, other.buffer
        for r in reversed(range(other.rows)):  # last row first: a row is moved before any row lands on it
            buffer[:, :, first + r, :, :other.lengths[r]] = buffer[:, :, r, :, :other.lengths[r]]
        mine = max(self.lengths)
        buffer[:, :, :first, :, :mine] = self.buffer[:, :, :first, :, :mine]
        buffer[:, :, :first, :, mine:] = 0  # columns these rows never wrote hold finite numbers
        self.buffer = buffer  # this batch's old, smaller buffer is freed (a spare beside a running batch is dead weight)
        self.lengths = self.lengths + other.lengths
        self._lengths_t = None
        other.buffer, other.lengths = None, []

    # ---- one decode step ---------------------------------------------------------------
    def advance(self) -> tuple[tuple, torch.Tensor | None, int]:
        """Make room for one more token per row and account for it.

        Returns (where each row's new key and value go: an index into one layer's
        (2, Bcap, H, Tcap, D) buffer taking a (B, 2, H, D) value; the (B, 1, 1, T) additive
        attention mask including the new column, None when no row has columns to hide; T).
        """
        positions = self.lengths_tensor()  # (B,) the new token's column in each row
        columns = max(self.lengths) + 1
        self._reserve(self.rows, columns)
        write = (slice(None), torch.arange(self.rows), slice(None), positions)
        mask = None
        if min(self.lengths) + 1 < columns:
            hide = torch.arange(columns)[None, :] > positions[:, None]  # (B, T)
            mask = torch.zeros(hide.shape).masked_fill_(hide, float("-inf"))[:, None, None, :]
        self.lengths = [n + 1 for n in self.lengths]
        self._lengths_t = positions + 1
        return write, mask, columns
