"""fp32 weights of a fast-path model packed for a faster kernel, where this CPU runs them faster:
Mynah's own (engine.serving.f32_native) or oneDNN's.

Which library multiplies fp32 fastest depends on the CPU. On Intel with AVX-512, MKL's one-row
path was measured the quicker, so the weights stay as loaded. Elsewhere MKL streams weights well
below memory's speed: on the AMD EPYC (Zen 4) oneDNN's packed layout ran 2.0-2.3x MKL at 1 to 351
rows, and on the AMD EPYC (Zen 3) Mynah's AVX2 kernel (fastpath/kernels/f32_gemm.c) ran a one-row
GPT-2 124M step's products at 15.3 GB/s against oneDNN's 10.6 and MKL's 12.8 (one thread), and
1.1-1.4x oneDNN at 16 to 320 rows (docs/BENCHMARKS.md, issue 23). So the CPU's vendor decides
whether to pack (`fp32_packing`), and the kernel is taken where it builds (else oneDNN;
`MYNAH_F32_KERNEL=off` keeps oneDNN).

The checkpoint's pages a packed matrix came from are paged out (`quantize.page_out`), so RSS
holds each weight once. That includes a tied output head, the token-embedding table read whole
every step (a third of GPT-2 124M's bytes a step): it is packed a block of rows at a time
(`quantize.PackedHead`, or `NativeF32Linear.fill`) when the table lies in the memory-mapped
checkpoint, whose pages then go; the embedding lookups read their rows from the file
(`file_rows.FileRows`), outside RSS. Llama-family q/k/v and gate/up are packed as one matrix each
(`fuse_projections`). A table in anonymous memory (a .bin checkpoint) keeps the head as it is:
packing would hold it twice.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from engine import cpu
from engine.serving import f32_native, file_rows, quantize
from engine.serving.fastpath import linear
from engine.serving.fastpath.kernels import f32_why_not


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


def fp32_packing() -> str:
    """How the fast paths' fp32 layers are packed on this CPU: "native" (Mynah's AVX2 kernel, where it
    builds and MYNAH_F32_KERNEL is not "off"), "onednn", or "" (kept as loaded: MKL, Intel's)."""
    if not onednn_is_faster():
        return ""
    return "native" if not f32_why_not() else "onednn"


def pack_if_faster(model: nn.Module) -> int:
    """Pack `model`'s fp32 layers (and a tied head whose table is file-backed) for the kernel that is
    the faster on this CPU (`fp32_packing`), leaving the rest on the checkpoint's mmap. Returns how
    many were packed (0: served as they are)."""
    packing = fp32_packing()
    if not packing:
        return 0
    fused = fuse_projections(model, packing)
    packed = pack_native(model) if packing == "native" else quantize.pack_fp32(model, keep_mapped=True)
    return fused + packed + pack_tied_head(model, packing) if fused + packed else 0


def pack_native(model: nn.Module) -> int:
    """Replace every fp32 `nn.Linear` / `Conv1D` (but a head tied to the embedding table) by an
    `f32_native.NativeF32Linear`, paging out the checkpoint's pages it came from. Returns how many."""
    if not quantize.can_pack(model):
        return 0
    conv1d = quantize.conv1d_class()
    head = quantize._output_head(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head and id(getattr(child, "weight", None)) in embeddings:
                continue  # tied to the input embedding: pack_tied_head
            if type(child) is not nn.Linear and not isinstance(child, conv1d):
                continue
            weight = child.weight.detach() if type(child) is nn.Linear else child.weight.detach().t()  # (out, in)
            setattr(parent, name, f32_native.NativeF32Linear(weight, child.bias))
            quantize.page_out([t.detach() for t in (child.weight, child.bias) if t is not None])
            packed += 1
    quantize.release_freed_memory()
    return packed


FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))  # Llama-family layer parts


def fuse_projections(model: nn.Module, packing: str = "onednn") -> int:
    """Llama family: each layer's q/k/v and gate/up packed as one matrix apiece (for `packing`'s kernel),
    the layers themselves becoming `FusedPart` views of it (as int8's fused calls). Returns how many.

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
            if packing == "native":
                stacked = f32_native.stacked(weights, [m.bias for m in modules])
                whole = linear.made("native_f32", module=stacked, in_features=stacked.in_features,
                                    out_features=stacked.out_features)
            else:
                whole = linear.made("packed", pointwise=True, in_features=weights[0].shape[1],
                                    weight=torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights), quantize.PACK_BATCH_HINT),
                                    bias=torch.cat(biases) if any(m.bias is not None for m in modules) else None,
                                    out_features=sum(w.shape[0] for w in weights))
            linear.replace_with_parts(parent, list(names), whole)
            quantize.page_out(weights)
            made += 1
    return made


def pack_tied_head(model: nn.Module, packing: str = "onednn") -> int:
    """Swap a bias-free fp32 output head tied to a memory-mapped embedding table for a packed copy of it:
    an `f32_native.NativeF32Linear` (packing "native") or a `quantize.PackedHead`.

    Returns 1 when swapped, else 0 (untied, int8, or a table in anonymous memory: packing it
    would hold the largest matrix twice). The table's pages go as each block is packed, and
    lookups read its rows from the file (`file_rows.FileRows`).
    """
    head, embed = quantize._output_head(model), model.get_input_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or type(embed) is not nn.Embedding \
            or head.weight is not embed.weight or head.weight.dtype != torch.float32 \
            or not quantize.file_backed(embed.weight):
        return 0
    model.set_output_embeddings(native_head(embed.weight) if packing == "native" else quantize.PackedHead(embed.weight))
    file_rows.read_from_file(model, embed)
    quantize.release_freed_memory()
    return 1


def native_head(table: torch.Tensor) -> f32_native.NativeF32Linear:
    """The output head `table` (V, E) packed for Mynah's kernel a block of rows at a time, each block's
    pages going as it is packed (the load's transient is one block, 12.6 MB for GPT-2 124M)."""
    head = f32_native.NativeF32Linear(None, None, shape=tuple(table.shape))
    for start in range(0, table.shape[0], f32_native.PACK_ROWS):
        block = table[start:start + f32_native.PACK_ROWS].detach()
        head.fill(start, block.float())
        quantize.page_out([block])
    return head
