"""fp32 weights of a fast-path model packed for oneDNN, where this CPU runs them faster.

Which library multiplies fp32 fastest depends on the CPU: on the AMD EPYC (Zen 4) box this
project runs on, torch's MKL reached 16 GB/s on a one-row step and oneDNN's packed layout
33 GB/s (2.0-2.3x at 1 to 351 rows; SmolLM2-135M's decode step 37.5 -> 26.2 ms at 1 chat,
95 -> 58 ms at 16; docs/BENCHMARKS.md), while on Intel with AVX-512 MKL's one-row path was
measured the quicker. So the CPU's vendor decides (`onednn_is_faster`).

The checkpoint's pages a packed matrix came from are paged out (`quantize.page_out`), so RSS
holds each weight once. That includes a tied output head, the token-embedding table read whole
every step (a third of GPT-2 124M's bytes a step): it is packed a block of rows at a time
(`quantize.PackedHead`) when the table lies in the memory-mapped checkpoint, whose pages then
go; the embedding lookups read their rows from the file (`file_rows.FileRows`), outside RSS.
One step: GPT-2 124M 22.3 -> 18.2 ms at 1 chat, 58.5 -> 44.1 at 16; SmolLM2-135M ~28 -> ~25 ms,
~65 -> ~52 (docs/BENCHMARKS.md). Llama-family q/k/v and gate/up are packed as one matrix each
(`fuse_projections`). A table in anonymous memory (a
.bin checkpoint) keeps the head as it is: packing would hold it twice.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from engine import cpu
from engine.serving import file_rows, quantize
from engine.serving.fastpath import linear


@functools.lru_cache(maxsize=1)
def onednn_is_faster() -> bool:
    """Whether oneDNN's packed fp32 linear is the faster here: on any CPU but Intel's.

    MKL (torch's fp32 BLAS) takes its fast kernels on Intel CPUs only; elsewhere oneDNN's packed
    layout was 2x faster at 1 to 351 rows (AMD EPYC, Zen 4), while on an Intel box with AVX-512
    MKL's one-row path was measured the quicker. A timing probe at load was tried first; in one
    benchmark run one bot process of eight served at MKL's speed: a fixed rule serves alike.
    """
    if not torch.backends.mkldnn.is_available() or not quantize._has_linear_pointwise():
        return False
    return cpu.vendor() != "GenuineIntel"


def pack_if_faster(model: nn.Module) -> int:
    """Pack `model`'s fp32 layers (and a tied head whose table is file-backed) for oneDNN where
    oneDNN is the faster on this CPU, leaving the rest on the checkpoint's mmap. Returns how
    many were packed (0: served as they are)."""
    if not onednn_is_faster():
        return 0
    fused = fuse_projections(model)
    packed = quantize.pack_fp32(model, keep_mapped=True)
    return fused + packed + pack_tied_head(model) if fused + packed else 0


FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))  # Llama-family layer parts


def fuse_projections(model: nn.Module) -> int:
    """Llama family: each layer's q/k/v and gate/up packed as one oneDNN matrix apiece, the layers
    themselves becoming `FusedPart` views of it (as int8's fused calls). Returns how many were made.

    One call on the stacked weight reads the same bytes as three (two) but runs faster: on the AMD
    box at one row q/k/v 79 -> 61 us a layer, gate/up 197 -> 184 us (out of cache, one thread).
    Stacking costs nothing held: the stacked copy is packed and every source page is paged out.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if getattr(getattr(model, "config", None), "model_type", None) not in ("llama", "qwen2", "mistral") or layers is None:
        return 0
    made = 0
    for layer in layers:
        for part, names in FUSED:
            parent = getattr(layer, part, None)
            modules = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in modules):
                continue
            weights = [m.weight.detach() for m in modules]
            biases = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features) for m in modules]
            whole = linear.made("packed", pointwise=True, in_features=weights[0].shape[1],
                                weight=torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), quantize.PACK_BATCH_HINT),
                                bias=torch.cat(biases) if any(m.bias is not None for m in modules) else None,
                                out_features=sum(w.shape[0] for w in weights))
            linear.replace_with_parts(parent, list(names), whole)
            quantize.page_out(weights)
            made += 1
    return made


def pack_tied_head(model: nn.Module) -> int:
    """Swap a bias-free fp32 output head tied to a memory-mapped embedding table for a `quantize.PackedHead`.

    Returns 1 when swapped, else 0 (untied, int8, or a table in anonymous memory: packing it
    would hold the largest matrix twice). The table's pages go as each block is packed, and
    lookups read its rows from the file (`file_rows.FileRows`).
    """
    head, embed = quantize._output_head(model), model.get_input_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or type(embed) is not nn.Embedding \
            or head.weight is not embed.weight or head.weight.dtype != torch.float32 \
            or not quantize.file_backed(embed.weight):
        return 0
    model.set_output_embeddings(quantize.PackedHead(embed.weight))
    file_rows.read_from_file(model, embed)
    quantize.release_freed_memory()
    return 1
