"""fp32 weights of a fast-path model packed for oneDNN, where this CPU runs them faster.

Which library multiplies fp32 fastest depends on the CPU: on the AMD EPYC (Zen 4) box this
project runs on, torch's MKL reached 16 GB/s on a one-row step and oneDNN's packed layout
33 GB/s (2.0-2.3x at 1 to 351 rows; SmolLM2-135M's decode step 37.5 -> 26.2 ms at 1 chat,
95 -> 58 ms at 16; docs/BENCHMARKS.md), while on Intel with AVX-512 MKL's one-row path was
measured the quicker. So the CPU's vendor decides (`onednn_is_faster`).

Only the layers' own matrices are packed: a tied output head is the token-embedding table,
and packing it would hold the largest matrix twice. The checkpoint's pages a packed matrix
came from are paged out (`quantize.page_out`), so RSS holds each weight once.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from engine.serving import quantize


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
    return _cpu_vendor() != "GenuineIntel"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def pack_if_faster(model: nn.Module) -> int:
    """Pack `model`'s fp32 layers for oneDNN where oneDNN is the faster on this CPU, leaving the
    rest on the checkpoint's mmap. Returns how many were packed (0: served as they are)."""
    return quantize.pack_fp32(model, keep_mapped=True) if onednn_is_faster() else 0
