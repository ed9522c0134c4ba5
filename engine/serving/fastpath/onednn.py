"""fp32 weights of a fast-path model packed for oneDNN, where this CPU runs them faster.

Which library multiplies fp32 fastest depends on the CPU: on the AMD EPYC (Zen 4) box this
project runs on, torch's MKL reached 16 GB/s on a one-row step and oneDNN's packed layout
33 GB/s (2.0-2.3x at 1 to 351 rows; SmolLM2-135M's decode step 37.5 -> 26.2 ms at 1 chat,
95 -> 58 ms at 16; docs/BENCHMARKS.md), while on Intel with AVX-512 MKL's one-row path was
measured the quicker. So a short probe at load decides, once per process.

Only the layers' own matrices are packed: a tied output head is the token-embedding table,
and packing it would hold the largest matrix twice. The checkpoint's pages a packed matrix
came from are paged out (`quantize.page_out`), so RSS holds each weight once.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from engine.serving.quantize import (PackedLinear, _conv1d_class, _output_head, _has_linear_pointwise, as_linear,
                                     can_pack, page_out, release_freed_memory)

log = logging.getLogger(__name__)

PROBE_SHAPE = (1024, 1024)  # fp32 matrices the probe multiplies: 4 of them, 16 MB (and their packed copies)
PROBE_MATRICES = 4
MARGIN = 0.9                # oneDNN must take at most this share of MKL's time at both row counts


@functools.lru_cache(maxsize=1)
def onednn_is_faster() -> bool:
    """Whether oneDNN's packed fp32 linear beats torch's default (MKL) on this CPU, at 1 and 16 rows."""
    if not torch.backends.mkldnn.is_available() or not _has_linear_pointwise():
        return False
    weights = [torch.randn(PROBE_SHAPE) for _ in range(PROBE_MATRICES)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    bias = torch.zeros(PROBE_SHAPE[0])
    verdicts = []
    for rows in (1, 16):
        x = torch.randn(rows, PROBE_SHAPE[1])
        mkl, dnn = _best_times(lambda: [F.linear(x, w) for w in weights],
                               lambda: [torch.ops.mkldnn._linear_pointwise(x, p, bias, "none", [], "") for p in packed])
        verdicts.append(dnn <= MARGIN * mkl)
        log.debug("fp32 linear, %d rows: MKL %.2f ms, oneDNN packed %.2f ms", rows, mkl * 1e3, dnn * 1e3)
    return all(verdicts)


def _best_times(first, second, repeats: int = 15) -> tuple[float, float]:
    """The fastest of `repeats` runs of each, taken in turns (a busy machine slows both alike)."""
    first(), second()  # warm-up (first calls pick kernels)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, run in enumerate((first, second)):
            started = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - started)
    return best[0], best[1]


def pack_if_faster(model: nn.Module) -> int:
    """Pack `model`'s fp32 layers for oneDNN when it has any and the probe finds oneDNN faster here.
    Returns how many were packed (0: served as they are)."""
    if not can_pack(model) or not _plain_layers(model) or not onednn_is_faster():
        return 0
    conv1d = _conv1d_class()
    packed = 0
    for parent, name, child in _plain_layers(model):
        original = [t.detach() for t in (child.weight, child.bias) if t is not None]
        if conv1d is not None and isinstance(child, conv1d):
            child = as_linear(child)
        setattr(parent, name, PackedLinear(child))
        page_out(original)
        packed += 1
    release_freed_memory()
    return packed


def _plain_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every fp32 `nn.Linear` / `Conv1D` but a tied output head."""
    conv1d = _conv1d_class()
    head = _output_head(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head and id(getattr(child, "weight", None)) in embeddings:
                continue
            if type(child) is nn.Linear or (conv1d is not None and isinstance(child, conv1d)):
                found.append((parent, name, child))
    return found
