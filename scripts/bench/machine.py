"""Machine facts for `mynah bench`: RSS now and at peak, memory bandwidth, CPU and library versions.

RSS is read from /proc (Linux); elsewhere the numbers fall back to getrusage or NaN.
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager

import torch

from engine import cpu


def rss_mb() -> float:
    """Resident set size of this process now (Linux), MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def rss_anon_mb() -> float:
    """The anonymous part of RSS (heap, tensors), MB: RSS without shared libraries and mapped files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """The process's high-water mark (VmHWM), MB: includes transients such as loading fp32 before int8."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@contextmanager
def rss_sampler(period_s: float = 0.02):
    """Largest RSS seen while the block runs (sampled), as holder["max_mb"]."""
    holder = {"max_mb": rss_mb(), "max_anon_mb": rss_anon_mb()}
    stop = threading.Event()

    def watch():
        while not stop.wait(period_s):
            holder["max_mb"] = max(holder["max_mb"], rss_mb())
            holder["max_anon_mb"] = max(holder["max_anon_mb"], rss_anon_mb())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        holder["max_mb"] = max(holder["max_mb"], rss_mb())


def measure_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Memory read bandwidth: best time to sum a tensor far larger than the caches (GB/s).

    Also reports copy bandwidth (read + write). Runs with the current torch thread count.
    """
    n = mb * 1_000_000 // 4
    data = torch.ones(n, dtype=torch.float32)
    out = torch.empty_like(data)
    data.sum()
    best_read = best_copy = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        data.sum()
        best_read = min(best_read, time.perf_counter() - t)
        t = time.perf_counter()
        out.copy_(data)
        best_copy = min(best_copy, time.perf_counter() - t)
    del data, out
    return {"read_gb_s": n * 4 / best_read / 1e9, "copy_gb_s": 2 * n * 4 / best_copy / 1e9, "tensor_mb": mb,
            "threads": torch.get_num_threads()}


# The instruction sets that decide which kernels run (fbgemm/oneDNN/MKL pick by them), as /proc/cpuinfo
# spells them (x86 "flags", Arm "Features") and as people say them.
SIMD_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
              "avx_vnni": "AVX-VNNI", "amx_tile": "AMX-TILE", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
              "asimd": "NEON", "asimddp": "NEON-DOTPROD", "sve": "SVE", "i8mm": "I8MM", "bf16": "BF16"}


def simd_features(flags: set[str]) -> list[str]:
    """The SIMD features among a CPU's `flags` that matter to the kernels, by name, in SIMD_FLAGS' order.

    The CPU's model name alone does not say them (a VM may show "Intel(R) Xeon(R) Processor"),
    and the box changes between runs: AVX2-only AMD one time, AVX-512 with AMX Intel another."""
    return [name for flag, name in SIMD_FLAGS.items() if flag in flags]


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    import transformers

    return {"cpu": cpu.model_name(), "cpu_features": simd_features(cpu.flags()), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "loadavg": [round(x, 2) for x in load]}
