"""Decode attention on a float16 KV cache: a small native kernel, built once with the system's C++ compiler.

Why: at 16 chats a decode step's attention reads every cached key and value, and that read is
memory-bound (GPT-2 124M: 7.4 MB a layer in float32). A float16 cache halves the read and the
cache's memory (GPT-2 124M int8, the bench's 16-chat burst: ~88 of the bot's ~540 MB peak were
the cache), but torch's CPU SDPA on float16 converts and ran ~2x slower than on float32. The
kernel (decode_attention.c) reads float16 and converts in registers (AVX2, FMA, F16C: every
x86-64 CPU with AVX2, AMD and Intel); measured against SDPA in docs/BENCHMARKS.md (issue 23).

This module defines the torch ops `mynah::decode_attention` and `mynah::gelu_tanh_` (GELU's tanh
approximation in one pass, for int8 GPT-2's MLPs: torch's ran ~5x slower here) so the fast paths'
TorchScript-compiled layers can name them; op.cpp is their native CPU kernels, so a compiled step calls it without Python
or the GIL. The library is built once (~10 s; g++ against the torch headers that ship in the
wheel) into `kernel_dir()`, named by a hash of its sources, torch's version and the flags. Where
it cannot be used (no C++ compiler, not x86-64, no AVX2, `MYNAH_KERNELS=off`) `why_not()` says
why, the fast paths keep torch's SDPA, and the op falls back to `reference` (torch ops, the same
numbers, slower).
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = (HERE / "decode_attention.c", HERE / "op.cpp")
CPU_FLAGS = ("avx2", "fma", "f16c")
SCHEMAS = ("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor",
           "gelu_tanh_(Tensor(a!) x) -> Tensor(a!)")

_lock = threading.Lock()
_state: dict = {}  # "path": the loaded library, or "why": why there is none
_LIBRARY = torch.library.Library("mynah", "DEF")  # the ops exist from import on: TorchScript can compile calls to them
for _schema in SCHEMAS:
    _LIBRARY.define(_schema)
_impl = ""  # the op's registered CPU implementation: "native", "reference" or none yet


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


def _command(compiler: str, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", "-x", "c", str(SOURCES[0]), "-x", "c++", str(SOURCES[1]), "-x", "none",
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-lm", "-o", str(output)]


def library_path() -> Path:
    """The built library's path: its name changes with its sources, torch's version and the command."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + torch.__version__.encode()
                            + " ".join(_command("c++", Path("out"))).encode()).hexdigest()[:16]
    return kernel_dir() / f"decode_attention-{digest}.so"


def build(compiler: str, target: Path) -> None:
    """Compile the kernel into `target` atomically (processes building at once each rename a whole file).
    The compiler gets PATH, locale and TMPDIR only: no bot tokens or API keys in a child that needs none."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TMPDIR") if key in os.environ}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(_command(compiler, built), env=env, check=True, capture_output=True, timeout=300)
        os.replace(built, target)


def _load() -> None:
    global _impl
    why = "turned off (MYNAH_KERNELS=off)" if os.environ.get("MYNAH_KERNELS", "").lower() == "off" else _cpu_has_flags()
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if not why and compiler is None:
        why = "no C++ compiler (c++ or g++) on PATH"
    if not why:
        target = library_path()
        try:
            if not target.exists():
                log.info("building the float16 decode-attention kernel (once, ~10 s) …")
                build(compiler, target)
            if _impl != "native":  # a library registers its implementation once per process
                torch.ops.load_library(str(target))
                _impl = "native"
            _state["path"] = target
            return
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = (getattr(exc, "stderr", b"") or b"")[-300:].decode(errors="replace").strip()
            why = f"could not build or load it ({type(exc).__name__}: {str(exc)[:200]}{'; ' + detail if detail else ''})"
    _state["why"] = why
    if not _impl:  # the ops still work (tests, a caller that asks anyway), through torch ops
        _LIBRARY.impl("decode_attention", reference, "CPU")
        _LIBRARY.impl("gelu_tanh_", reference_gelu_tanh_, "CPU")
        _impl = "reference"


def why_not() -> str:
    """"" when the native kernel is ready (built and loaded now if it was not), else why it is not used."""
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


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """What the kernel computes, in torch ops: each row's new query (q: (B, Hq, D) float32) over its first
    lengths[row] columns of k and v ((Bcap, Hkv, Tcap, D), float16), in float32; (B, Hq, D)."""
    rows, heads, width = q.shape
    kv_heads, columns = k.shape[1], k.shape[2]
    if int(lengths.min()) < 1 or int(lengths.max()) > columns:
        raise RuntimeError("decode_attention: a length outside 1 … the cache's columns")
    see = torch.arange(columns)[None, :] < lengths[:, None]  # (B, T)
    a = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, heads // kv_heads, width), k[:rows].float(),
                                       v[:rows].float(), attn_mask=see[:, None, None, :], scale=scale)
    return a.reshape(rows, heads, width)


def reference_gelu_tanh_(x: torch.Tensor) -> torch.Tensor:
    """What `mynah::gelu_tanh_` computes, in torch ops: GELU's tanh approximation, in place."""
    return x.copy_(F.gelu(x, approximate="tanh"))
