"""Decode attention on a float16 KV cache: a small C kernel, built once with the system's C compiler.

Why: at 16 chats a decode step's attention reads every cached key and value, and that read is
memory-bound (GPT-2 124M: 7.4 MB a layer in float32). A float16 cache halves the read and the
cache's memory (GPT-2 124M int8, the bench's 16-chat burst: ~88 of the bot's ~540 MB peak are
the cache), but torch's CPU SDPA on float16 converts and ran ~2x slower than on float32. The
kernel (decode_attention.c) reads float16 and converts in registers (AVX2, FMA, F16C: every
x86-64 CPU with AVX2, AMD and Intel); measured against SDPA in docs/BENCHMARKS.md (issue 23).

The kernel is plain C called through ctypes (no torch headers: it builds in well under a second)
and registered as the torch op `mynah::decode_attention`, so the fast paths' TorchScript-compiled
layers call it like any other op. Where it cannot be used (no C compiler, not x86-64, no AVX2,
`MYNAH_KERNELS=off`) `why_not()` says why and the fast paths keep torch's SDPA.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC"]
CPU_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded kernel, or "why": why there is none
_pool: ThreadPoolExecutor | None = None


def kernel_dir() -> Path:
    """Where built kernels are kept: $MYNAH_KERNEL_DIR, else the user's cache folder."""
    if os.environ.get("MYNAH_KERNEL_DIR"):
        return Path(os.environ["MYNAH_KERNEL_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mynah" / "kernels"


def _cpu_has_flags() -> str:
    """"" when this CPU runs the kernel, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    missing = [flag for flag in CPU_FLAGS if flag not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else ""


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target` (atomically: processes building at once each rename a whole file).
    The compiler gets a minimal environment: no bot tokens or API keys in a child that needs none."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {key: os.environ[key] for key in ("PATH", "LANG", "TMPDIR") if key in os.environ}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], env=env, check=True,
                       capture_output=True, timeout=120)
        os.replace(built, target)


def _load() -> None:
    why = "turned off (MYNAH_KERNELS=off)" if os.environ.get("MYNAH_KERNELS", "").lower() == "off" else _cpu_has_flags()
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not why and compiler is None:
        why = "no C compiler (cc) on PATH"
    if why:
        _state["why"] = why
        return
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = kernel_dir() / f"decode_attention-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
            log.info("built the float16 decode-attention kernel: %s", target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _state["why"] = f"could not build or load it ({type(exc).__name__}: {str(exc)[:200]} {detail[-300:].decode(errors='replace')})".strip()
        return
    fn = lib.mynah_decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
    _state["lib"] = fn


def why_not() -> str:
    """"" when the kernel is ready (built and loaded now if it was not), else why it cannot be used."""
    with _lock:
        if not _state:
            _load()
            if "why" in _state:
                log.info("float16 decode-attention kernel not used: %s", _state["why"])
    return _state.get("why", "")


def available() -> bool:
    return not why_not()


def fits(head_dim: int) -> bool:
    """True when the kernel is ready and serves heads `head_dim` wide (a multiple of 8, at most 256)."""
    return head_dim % 8 == 0 and head_dim <= 256 and available()


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, out: torch.Tensor,
         begin: int, end: int, scale: float) -> None:
    hq, hkv, t_cap, d = q.shape[1], k.shape[1], k.shape[2], q.shape[2]
    scratch = torch.empty(t_cap * max(1, hq // hkv))
    rc = _state["lib"](q.data_ptr(), k.data_ptr(), v.data_ptr(), lengths.data_ptr(), out.data_ptr(), begin, end,
                       hq, hkv, d, t_cap, k.stride(0), k.stride(1), scale, scratch.data_ptr(), scratch.numel())
    if rc:  # the C side checks every length against the cache's columns: nothing is read out of bounds
        raise ValueError(f"decode_attention: {'a length outside 1 … ' + str(t_cap) if rc == -2 else 'bad shapes'} "
                         f"(q {tuple(q.shape)}, cache {tuple(k.shape)})")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of each row's one new query over its first lengths[row] cached columns.

    q: (B, Hq, D) float32; k, v: (Bcap ≥ B, Hkv, Tcap, D) float16 views of one layer's cache (columns
    contiguous); lengths: (B,) int64. Returns (B, Hq, D) float32. With several torch threads the rows
    are split among them (the C call lets go of the GIL)."""
    if "lib" not in _state:
        raise RuntimeError(f"the float16 decode-attention kernel is not available: {why_not() or 'not loaded'}")
    if (q.dtype != torch.float32 or k.dtype != torch.float16 or v.dtype != torch.float16 or lengths.dtype != torch.int64
            or q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.stride() != v.stride() or k.stride(3) != 1
            or k.stride(2) != k.shape[3] or q.shape[2] != k.shape[3] or q.shape[0] > k.shape[0]
            or lengths.shape != (q.shape[0],)):
        raise ValueError("decode_attention: q (B, Hq, D) float32, k/v (Bcap, Hkv, Tcap, D) float16, lengths (B,) int64 in 1 … Tcap")
    q, lengths = q.contiguous(), lengths.contiguous()
    out = torch.empty_like(q)
    rows, threads = q.shape[0], torch.get_num_threads()
    if threads < 2 or rows < 2:
        _run(q, k, v, lengths, out, 0, rows, scale)
        return out
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="mynah-attention")
    bounds = [rows * i // threads for i in range(threads + 1)]
    parts = [_pool.submit(_run, q, k, v, lengths, out, bounds[i], bounds[i + 1], scale)
             for i in range(1, threads) if bounds[i] < bounds[i + 1]]
    _run(q, k, v, lengths, out, bounds[0], bounds[1], scale)
    for part in parts:
        part.result()
    return out


_LIBRARY = torch.library.Library("mynah", "DEF")  # the op exists from import on, so TorchScript can compile calls to it
_LIBRARY.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor")
_LIBRARY.impl("decode_attention", decode_attention, "CPU")
