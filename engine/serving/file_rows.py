"""An embedding table looked up by reading its rows from the checkpoint file, not through its memory map.

Serving keeps a token-embedding table in the memory-mapped safetensors checkpoint when nothing
multiplies by it (int8: the head is quantized; fp32 on oneDNN: the head is packed), so RSS holds
it once. But a lookup through the map brings in more than its row: the kernel maps the pages
around each faulting one (fault-around, 64 KB), so a burst's prefill of ~1,000 tokens brought
~20-30 MB of a GPT-2 124M-shaped table (49,152 x 768 fp32, 151 MB) into the bot's RSS, and a
busy bot crept towards the whole table between idle page-outs. `FileRows` reads each row with
`pread` into a fresh tensor: the file's pages stay in the page cache, outside the process's RSS,
and the map's pages are paged out once. One `pread` a token costs ~2 us (a 16-chat prefill:
~2 ms of its ~0.2 s).
"""
from __future__ import annotations

import os
import weakref

import torch
from torch import nn


def file_location(t: torch.Tensor) -> tuple[str, int] | None:
    """(path, byte offset) of `t`'s bytes when they lie in one mapping of a file, per /proc/self/maps."""
    if t.device.type != "cpu" or t.is_mkldnn or t.numel() == 0 or not t.is_contiguous():
        return None
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(a, 16) for a in fields[0].split("-"))
                if low <= start < high:
                    if end > high or len(fields) < 6 or fields[4] == "0" or not fields[5].startswith("/"):
                        return None
                    return fields[5].rstrip("\n"), int(fields[2], 16) + start - low
    except OSError:
        pass
    return None


class FileRows(nn.Module):
    """`embedding`'s lookups read from the file its table is mapped from (`file_location`).

    Same outputs as the `nn.Embedding` it replaces (ids of any shape; an id out of range raises
    IndexError). `weight` stays the mapped table, for anything that reads the whole of it.
    """

    def __init__(self, embedding: nn.Embedding, path: str, offset: int):
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.row_bytes = self.embedding_dim * embedding.weight.element_size()
        self.offset = offset
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        weakref.finalize(self, os.close, self.fd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.embedding_dim, dtype=self.weight.dtype)
        rows = memoryview(out.view(torch.uint8).numpy()).cast("B") if flat else None
        size, n = self.row_bytes, self.num_embeddings
        for i, token in enumerate(flat):
            if not 0 <= token < n:
                raise IndexError(f"token id {token} is out of the table's range (0 to {n - 1})")
            if os.preadv(self.fd, [rows[i * size:(i + 1) * size]], self.offset + token * size) != size:
                raise OSError(f"short read of embedding row {token}")
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read from the checkpoint file"


def read_from_file(model: nn.Module, embedding: nn.Module) -> bool:
    """Swap `embedding` (an `nn.Embedding` of `model` whose table lies in a mapped file) for `FileRows`.
    False (nothing changed) when the table is not in a file. The caller pages the mapped table out
    (`quantize.page_out`) once nothing else reads it whole."""
    location = file_location(embedding.weight) if type(embedding) is nn.Embedding else None
    if location is None:
        return False
    rows = FileRows(embedding, *location)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is embedding:
                setattr(parent, name, rows)
    return True
