"""CPU weight formats for serving: dynamic int8 quantization, and fp32 weights pre-packed for oneDNN.

`torch.ao.quantization.quantize_dynamic` swaps `nn.Linear` layers for int8 ones whose
weights are stored as int8 (one scale per output channel) and whose activations are
quantized on the fly at each call. GPT-2's blocks use transformers' `Conv1D` (a linear
layer with its weight stored transposed), which quantize_dynamic does not know, so on a
stock GPT-2 it would quantize only `lm_head`. We first turn every `Conv1D` into an
equivalent `nn.Linear` (weight transposed; outputs identical), then quantize them all.

At batch 1 decoding is memory-bandwidth bound, so reading a quarter of the bytes per
token is the point; the effect on quality is measured by `mynah bench` (next-token
agreement and held-out loss against fp32, see docs/BENCHMARKS.md). Where the native kernels
build (x86-64 with AVX2) the int8 layers run on Mynah's own kernel instead of fbgemm
(engine.serving.int8_native: the same int8 weights, each input row quantized on its own).

fp32 models keep their numbers but not their layout: `pack_fp32` stores each linear
layer's weight in oneDNN's blocked format once, so every decode step runs oneDNN's
matrix multiply on it (1.5-2.4x the GFLOP/s of the default path for the small row counts
of decoding on this machine; same results to ~1e-6). The engine does this by default.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import os
import sys
import warnings

import torch
from torch import nn

from engine.serving import file_rows

log = logging.getLogger(__name__)


def conv1d_class() -> tuple:
    """The GPT-2 Conv1D classes a served model may hold (for isinstance): engine.lean's, and transformers'
    where transformers' models are loaded. A model holds transformers' Conv1D only if its modeling code
    (which imports that module) ran, so a lean-served bot never imports transformers just to ask."""
    from engine.lean.gpt2 import Conv1D

    theirs = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (Conv1D,) if theirs is None else (Conv1D, theirs)


def as_linear(conv) -> nn.Linear:
    """The `nn.Linear` equal to a transformers `Conv1D` (which computes x @ W + b with W: [in, out])."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` in `model` by an equal `nn.Linear`; returns how many."""
    conv1d = conv1d_class()
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, conv1d):
                setattr(parent, name, as_linear(child))
                replaced += 1
    return replaced


_LIBC = None


def _libc():
    """glibc, loaded once; None where there is none (then the calls below do nothing)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC or None


def release_freed_memory(collect: bool = True) -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise), so RSS shows the truth.

    collect: run Python's garbage collector first (holds the GIL; the engine's idle call skips it).
    """
    if collect:
        gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)   # not glibc: nothing to do
    if trim is not None:
        trim(0)


_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Let glibc give this process's threads at most `arenas` malloc arenas (call before they start).

    By default each thread that allocates gets an arena of its own (up to 8 per core), and
    memory one thread frees stays in its arena for that thread: the model loads in one
    thread, the engine's worker decodes in another, so a burst's KV cache and activations
    could not reuse the pages the load freed. One arena measured 665 MB peak RSS against
    746 MB for a 16-chat burst on SmolLM2-135M int8 (docs/BENCHMARKS.md, issue 23). An
    explicit MALLOC_ARENA_MAX in the environment wins. True when the limit was set.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now, keeping their contents (re-read on the next touch)


def page_out(tensors: list[torch.Tensor]) -> None:
    """Drop the pages a layer's fp32 tensors occupy from this process's RSS once they are converted.

    The checkpoint is memory-mapped: every page quantization reads stays resident (counted
    in RSS) until the whole file is unmapped, so without this the int8 load peaks at the
    full fp32 model plus the int8 one. MADV_PAGEOUT never changes contents (a clean file page
    is re-read if touched again, e.g. by a tied output head; an anonymous page is swapped out
    or, without swap, left alone), so it is safe on any tensor.
    """
    libc = _libc()
    if libc is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        size = t.numel() * t.element_size()
        if t.is_mkldnn or t.device.type != "cpu" or size < page:
            continue
        start = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + size) // page) * page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)  # EINVAL on old kernels: no-op


def quantize_int8(model: nn.Module, *, per_channel: bool = True, include_lm_head: bool = True,
                  embeddings: bool = True) -> nn.Module:
    """A CPU model whose linear layers (Conv1D included) run in dynamic int8; eval mode.

    Layers are converted one at a time (Conv1D → Linear → int8), so loading never holds a
    second fp32 copy of the model, and each converted layer's pages of the memory-mapped
    checkpoint are paged out (`page_out`), so nor does it hold the whole fp32 file resident.

    per_channel: one weight scale per output row (better quality than one per tensor, same speed).
    include_lm_head: also quantize the output projection (the largest matrix of a small
        GPT-2: 38.6M of its 124M parameters).
    embeddings: keep the token/position tables out of RSS too. They are only looked up,
        never multiplied: a table read from the memory-mapped checkpoint stays there in fp32
        (`file_backed`; its pages are paged out, and lookups read their rows from the file,
        `file_rows.FileRows`), so a tied table is held once (as the int8 output head) instead
        of twice; a table in anonymous memory (GGUF-converted, a .bin checkpoint) is stored as
        8-bit rows.
    Remaining fp32 tensors are copied out of the checkpoint's memory map, so the fp32 file
    pages are released and RSS is what the int8 model needs.
    """
    from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, \
        per_channel_dynamic_qconfig

    from engine.serving.int8_native import native_or_same  # here: it loads the fast paths, which import this module

    model = model.to("cpu").eval()
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    head = _output_head(model)
    conv1d = conv1d_class()
    counts = {"linear": 0, "embedding": 0}
    in_file: list[nn.Embedding] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                read = [t for t in (getattr(child, "weight", None), getattr(child, "bias", None)) if t is not None]
                if isinstance(child, conv1d):
                    child = as_linear(child)
                if type(child) is nn.Linear and (include_lm_head or child is not head):
                    child.qconfig = qconfig
                    big = per_channel and child.weight.numel() > CHUNK_ROWS_ABOVE
                    setattr(parent, name, _int8_in_chunks(child) if big else native_or_same(DynamicInt8Linear.from_float(child)))
                    counts["linear"] += 1
                elif type(child) is nn.Embedding and embeddings and file_backed(child.weight):
                    in_file.append(child)  # rows read from the file once the head (perhaps this table) is done
                    continue
                elif type(child) is nn.Embedding and embeddings and child.padding_idx is None:
                    child.qconfig = float_qparams_weight_only_qconfig
                    setattr(parent, name, QuantizedEmbedding.from_float(child))
                    counts["embedding"] += 1
                else:
                    continue
                page_out(read)
                del child, read
                release_freed_memory(collect=False)  # each layer's fp32 copies: the next reuses no fragments
    _own_memory(model, keep={e.weight.data_ptr() for e in in_file})
    read_from_file = [file_rows.read_from_file(model, e) for e in in_file]
    page_out([e.weight.data for e in in_file])
    release_freed_memory()
    log.debug("int8: %d linear layers and %d embeddings quantized, %d tables read from the checkpoint file",
              counts["linear"], counts["embedding"], sum(read_from_file))
    return model


CHUNK_ROWS_ABOVE = 8_000_000  # weights with more elements than this are quantized a block of rows at a time
CHUNK_ROWS = 4096


def _int8_in_chunks(linear: nn.Linear) -> nn.Module:
    """`DynamicInt8Linear.from_float(linear)` (per-channel qconfig), a block of rows at a time.

    Per-channel scales depend on each row alone, so the result is identical; what differs is
    the peak: from_float holds the whole fp32 matrix's pages, a placeholder int8 matrix and its
    packing, the quantized matrix and its packing at once (+270 MB for GPT-2's 154 MB output
    head); here the fp32 pages go as each block is done, and no placeholder is made.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from engine.serving.int8_native import VNNI_PANEL, NativeInt8Linear, int8_why_not

    weight = linear.weight.detach()
    if not int8_why_not() and linear.qconfig.weight().qscheme == torch.per_channel_symmetric:
        # Mynah's kernel (int8_native): each block packed as it is made (no fbgemm pack, no whole int8 copy)
        layer = NativeInt8Linear(None, None, linear.bias, shape=tuple(weight.shape))
        for start, q in _quantized_blocks(linear, -(-CHUNK_ROWS // VNNI_PANEL) * VNNI_PANEL):  # whole panels of the layout
            layer.fill(start, q.int_repr(), q.q_per_channel_scales())
        return layer
    rows = torch.empty(weight.shape, dtype=torch.int8)
    scales, zeros = [], []
    for start, q in _quantized_blocks(linear, CHUNK_ROWS):
        rows[start:start + CHUNK_ROWS] = q.int_repr()
        scales.append(q.q_per_channel_scales())
        zeros.append(q.q_per_channel_zero_points())
    qweight = torch._make_per_channel_quantized_tensor(rows, torch.cat(scales), torch.cat(zeros), 0)
    del rows
    qlinear = DynamicInt8Linear(1, 1, dtype=torch.qint8)  # a 1x1 placeholder, replaced below
    qlinear.in_features, qlinear.out_features = linear.in_features, linear.out_features
    qlinear.set_weight_bias(qweight, linear.bias)
    return qlinear


def _quantized_blocks(linear: nn.Linear, step: int):
    """(first row, that block of `step` rows quantized by the layer's per-channel qconfig), block by block;
    each block's fp32 pages are paged out once the caller has taken its int8 rows."""
    from torch.ao.nn.quantized.modules.utils import _quantize_weight

    weight = linear.weight.detach()
    for start in range(0, weight.shape[0], step):
        block = weight[start:start + step]
        observer = linear.qconfig.weight()
        observer(block)
        yield start, _quantize_weight(block.float(), observer)
        page_out([block])


def file_backed(t: torch.Tensor) -> bool:
    """Whether `t`'s bytes lie in a mapping of a file (e.g. the safetensors checkpoint), per /proc/self/maps."""
    return file_rows.file_location(t) is not None


PACK_BATCH_HINT = 16  # rows oneDNN tunes the packed layout for (decode batches are 1-32 rows)
_POINTWISE: bool | None = None


def _has_linear_pointwise() -> bool:
    """Whether this torch has oneDNN's dense-in/dense-out linear with pre-packed weights (torch ≥ 2.1)."""
    global _POINTWISE
    if _POINTWISE is None:
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8), 1)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), w, torch.zeros(8), "none", [], "")
            _POINTWISE = bool(torch.allclose(y, torch.full((2, 8), 8.0)))
        except (AttributeError, RuntimeError):
            _POINTWISE = False
    return _POINTWISE


class PackedLinear(nn.Module):
    """An fp32 linear layer whose weight is pre-packed for oneDNN (inference only, CPU).

    Same function as the `nn.Linear` (or transformers `Conv1D`) it replaces; inputs of any
    leading shape. The weight stays a (non-trainable) parameter, so parameter counts hold.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(self.out_features)
        # torch's oneDNN linear with a pre-reordered weight takes and returns dense tensors (no
        # to_mkldnn/to_dense per call) and can fuse the MLP's GELU; older torch: mkldnn_linear
        self.pointwise = _has_linear_pointwise()
        if self.pointwise:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        else:
            self.weight = nn.Parameter(weight.to_mkldnn(), requires_grad=False)
            self.bias = nn.Parameter(bias.contiguous().to_mkldnn(), requires_grad=False)

    @property
    def dense_bias(self) -> torch.Tensor:
        return self.bias if self.pointwise else self.bias.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if self.pointwise:
            y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.weight, self.bias, "none", [], "")
        else:
            y = torch._C._nn.mkldnn_linear(flat.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed fp32"


HEAD_BLOCK_ROWS = 4096  # rows packed at a time: the load's transient is one block (12.6 MB for GPT-2 124M)


class PackedHead(nn.Module):
    """A tied output head packed for oneDNN in blocks of rows: the logits are the blocks' outputs
    side by side. Inference only; the embedding table it came from stays the model's."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = table.shape[1], table.shape[0]
        self.blocks = nn.ParameterList()
        for start in range(0, table.shape[0], HEAD_BLOCK_ROWS):
            block = table[start:start + HEAD_BLOCK_ROWS].detach()
            packed = torch.ops.mkldnn._reorder_linear_weight(block.float().contiguous(), PACK_BATCH_HINT)
            self.blocks.append(nn.Parameter(packed, requires_grad=False))
            page_out([block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float().contiguous()
        logits = torch.cat([torch.ops.mkldnn._linear_pointwise(flat, w, None, "none", [], "") for w in self.blocks], 1)
        return logits.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed fp32 in {len(self.blocks)} blocks"


def can_pack(model: nn.Module) -> bool:
    """fp32 weights on the CPU and a torch built with oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    params = [p for p in model.parameters() if not p.is_mkldnn]
    return bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)


def pack_fp32(model: nn.Module, *, keep_mapped: bool = False) -> int:
    """Replace every fp32 `nn.Linear` / `Conv1D` of an eval-mode CPU model by a `PackedLinear`.

    Returns how many layers were packed (0 when the model cannot be packed). The model is
    changed in place and is for inference only afterwards (no gradients, no saving).
    A tied output head stays as it is (it is the token-embedding table: packing it would keep
    a second copy of the largest matrix, 154 MB for GPT-2 124M).
    keep_mapped: leave the rest of the model on the checkpoint's mmap and page out what each
    packed layer came from (the fast path reads embedding rows from the mapped file); else
    every float tensor left is copied into memory of its own (`_own_memory`).
    """
    if not can_pack(model):
        return 0
    conv1d = conv1d_class()
    head = _output_head(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child is head and id(getattr(child, "weight", None)) in embeddings:
                continue  # tied to the input embedding
            if type(child) is not nn.Linear and not isinstance(child, conv1d):
                continue
            original = [t.detach() for t in (child.weight, child.bias) if t is not None]
            setattr(parent, name, PackedLinear(child if type(child) is nn.Linear else as_linear(child)))
            if keep_mapped:
                page_out(original)
            packed += 1
    if not keep_mapped:
        _own_memory(model)
    release_freed_memory()
    return packed


def _own_memory(model: nn.Module, keep: set[int] = frozenset()) -> None:
    """Copy every float tensor left in the model, dropping views onto the checkpoint's mmap
    (except tensors whose data pointer is in `keep`)."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_mkldnn and param.data_ptr() not in keep:
                    param.data = param.data.clone()
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.clone()


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if get is not None else None
    except Exception:  # noqa: BLE001 - models without output embeddings
        return None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every layer's weights except embedding tables.

    An embedding table is only gathered (one row per token), unless it doubles as the fp32
    output projection (tied GPT-2 lm_head), where the whole of it is read every step.
    Packed int8 weights count one byte per element (plus their fp32 bias).
    """
    total = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, file_rows.FileRows)):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        if hasattr(module, "weight_bytes"):  # int8_native.NativeInt8Linear: its weights are buffers
            total += module.weight_bytes()
        packed = getattr(module, "_packed_params", None)
        whole = getattr(module, "whole", None)  # a part of a fused int8 call (fastpath.linear.FusedPart)
        if whole is not None and id(whole) not in seen and whole.kind in ("native", "native_f32"):
            seen.add(id(whole))
            total += whole.module.weight_bytes()
        elif whole is not None and id(whole) not in seen:
            seen.add(id(whole))
            weight, bias = torch.ops.quantized.linear_unpack(whole.packed) if whole.kind == "int8" else (whole.weight, whole.bias)
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size()
            if bias is not None:
                total += bias.numel() * bias.element_size()
    return total
