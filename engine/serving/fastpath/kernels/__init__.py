"""Mynah's native kernels, built once with the system's C++ compiler: decode attention on a float16
KV cache, an int8 linear layer and an fp32 one.

Why the attention kernel: at 16 chats a decode step's attention reads every cached key and value,
and that read is memory-bound (GPT-2 124M: 7.4 MB a layer in float32). A float16 cache halves the
read and the cache's memory (GPT-2 124M int8, the bench's 16-chat burst: ~88 of the bot's ~540 MB
peak were the cache), but torch's CPU SDPA on float16 converts and ran ~2x slower than on float32.
The kernel (decode_attention.c) reads float16 and converts in registers (AVX2, FMA, F16C: every
x86-64 CPU with AVX2, AMD and Intel); measured against SDPA in docs/BENCHMARKS.md (issue 23).

Why the int8 kernel (int8_gemm.c, AVX-512 VNNI and AMX, or AVX2 where the CPU has no VNNI;
engine.serving.int8_native packs its weights for the one that runs, `int8_vnni`): a lone chat's
int8 step is 121 one-row products on SmolLM2-135M, memory-bound, and fbgemm's call spent 12-25 %
more at 1 to 300 rows on Intel, ~20-40 % more at one row on AMD (Zen 3). Where the library cannot
be used, or with MYNAH_INT8_KERNEL=off (`int8_why_not`), fbgemm stays.

Why the fp32 kernel (f32_gemm.c, AVX2 + FMA; engine.serving.f32_native packs its weights): on CPUs
where torch's fp32 libraries stream weights below memory's speed (fastpath.onednn decides where:
every CPU but Intel's) a lone chat's fp32 step ran at 10.6 GB/s through oneDNN and 12.8 through MKL
on the AMD EPYC (Zen 3) against 15.3 through this kernel; MYNAH_F32_KERNEL=off (`f32_why_not`) keeps
oneDNN.

This module defines the torch ops `mynah::decode_attention`, `mynah::gelu_tanh_` (GELU's tanh
approximation in one pass, for int8 GPT-2's MLPs: torch's ran ~5x slower here), `mynah::silu_mul`
and `mynah::rms_norm` (int8 Llama-family layers' SwiGLU middle and RMSNorm in one pass each: fewer
passes and no temporaries; fp32 keeps transformers' ops for its exact tokens) and
`mynah::linear_u8s8` / `mynah::linear_f32` so the fast paths' TorchScript-compiled layers can name them; op.cpp is their
native CPU kernels, so a compiled step calls them without Python or the GIL. The library is built
once (~10 s; g++ against the torch headers that ship in the wheel) into `kernel_dir()`, named by a
hash of its sources, torch's version and the flags. Where it cannot be used (no C++ compiler, not
x86-64, no AVX2, `MYNAH_KERNELS=off`) `why_not()` says why, the fast paths keep torch's SDPA and
fbgemm, and the ops fall back to `reference` & co. (torch ops, the same numbers, slower).
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
SOURCES = (HERE / "decode_attention.c", HERE / "int8_gemm.c", HERE / "f32_gemm.c", HERE / "op.cpp")
CPU_FLAGS = ("avx2", "fma", "f16c")
VNNI_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")  # int8_gemm.c's VNNI/AMX path
SCHEMAS = ("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, float scale) -> Tensor",
           "gelu_tanh_(Tensor(a!) x) -> Tensor(a!)",
           "linear_u8s8(Tensor x, Tensor w, Tensor w_sum, Tensor w_scale, Tensor? bias, int n) -> Tensor",
           "linear_f32(Tensor x, Tensor w, Tensor? bias, int n) -> Tensor",
           "silu_mul(Tensor gate_up) -> Tensor",
           "rms_norm(Tensor x, Tensor weight, float eps) -> Tensor",
           "kernel_threads() -> int")

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


def _cpu_has_flags(wanted: tuple[str, ...] = CPU_FLAGS) -> str:
    """"" when this CPU has the instructions `wanted` (/proc/cpuinfo's names), else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    missing = [flag for flag in wanted if flag not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else ""


def _command(compiler: str, output: Path, openmp: bool = True) -> list[str]:
    """g++'s command line. -fopenmp: torch's at::parallel_for is OpenMP in the header, so without it every
    kernel loop ran on one thread (the library then shares the libgomp torch has loaded, by its soname)."""
    torch_dir = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-w", *(["-fopenmp"] if openmp else []),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            f"-I{torch_dir / 'include'}", *[a for c in SOURCES[:-1] for a in ("-x", "c", str(c))],  # g++ takes a second file as C++ otherwise
            "-x", "c++", str(SOURCES[-1]), "-x", "none",
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-lm", "-o", str(output)]


def library_path() -> Path:
    """The built library's path: its name changes with its sources, torch's version and the command."""
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + torch.__version__.encode()
                            + " ".join(_command("c++", Path("out"))).encode()).hexdigest()[:16]
    return kernel_dir() / f"kernels-{digest}.so"


def build(compiler: str, target: Path) -> None:
    """Compile the kernel into `target` atomically (processes building at once each rename a whole file).
    The compiler gets PATH, locale and TMPDIR only: no bot tokens or API keys in a child that needs none."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    env = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TMPDIR") if key in os.environ}
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        try:
            subprocess.run(_command(compiler, built), env=env, check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError:  # a compiler without OpenMP: the kernels on one thread beat none
            subprocess.run(_command(compiler, built, openmp=False), env=env, check=True, capture_output=True, timeout=300)
            log.warning("native kernels built without OpenMP (the compiler refused -fopenmp): they run on one thread")
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
                log.info("building the native kernels (once, ~10 s) …")
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
        _LIBRARY.impl("linear_u8s8", reference_linear_u8s8, "CPU")
        _LIBRARY.impl("linear_f32", reference_linear_f32, "CPU")
        _LIBRARY.impl("silu_mul", reference_silu_mul, "CPU")
        _LIBRARY.impl("rms_norm", reference_rms_norm, "CPU")
        _LIBRARY.impl("kernel_threads", lambda: 1, "CompositeExplicitAutograd")
        _impl = "reference"


def why_not() -> str:
    """"" when the native kernel is ready (built and loaded now if it was not), else why it is not used."""
    with _lock:
        if not _state:
            _load()
            if "why" in _state:
                log.info("native kernels (float16 decode attention, int8 linear) not used: %s", _state["why"])
    return _state.get("why", "")


def available() -> bool:
    return not why_not()


def int8_why_not() -> str:
    """"" when the int8 linear kernel (int8_gemm.c) runs here, else why not (then int8 layers stay on fbgemm)."""
    why = why_not()  # loads the library, or registers the ops' torch-ops references
    if os.environ.get("MYNAH_INT8_KERNEL", "").lower() == "off":
        return "turned off (MYNAH_INT8_KERNEL=off)"
    return why


def f32_why_not() -> str:
    """"" when the fp32 linear kernel (f32_gemm.c) runs here, else why not (MYNAH_F32_KERNEL=off turns it off)."""
    why = why_not()
    if os.environ.get("MYNAH_F32_KERNEL", "").lower() == "off":
        return "turned off (MYNAH_F32_KERNEL=off)"
    return why


def int8_vnni() -> bool:
    """Whether int8 layers take the AVX-512 VNNI kernel (and AMX where there is one) rather than the
    AVX2 one: the CPU has VNNI and `MYNAH_VNNI` is not "off". Their weights are packed to suit."""
    return os.environ.get("MYNAH_VNNI", "").lower() != "off" and not _cpu_has_flags(VNNI_CPU_FLAGS)


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


def reference_linear_u8s8(x: torch.Tensor, w: torch.Tensor, w_sum: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """What `mynah::linear_u8s8` computes (int8_gemm.c's numbers), in torch ops: x (M, K) float32 → (M, n)."""
    m, k = x.shape
    panels, groups, width = w.shape[:3]
    rows = w.permute(0, 2, 1, 3).reshape(panels * width, groups * 4)[:n, :k]  # (n, k) int8: the packing undone
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    s = (hi - lo) / 255
    s = torch.where((s > 0) & s.isfinite(), s, torch.ones_like(s))
    z = torch.round(-lo / s).clamp(0, 255)
    q = (torch.round(x * (1 / s)) + z).clamp(0, 255)
    acc = (q.double() @ rows.double().t()).float()  # exact sums
    y = (acc - z * w_sum[:n].float()) * (w_scale[:n] * s)
    return y + bias[:n] if bias is not None else y


def reference_linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """What `mynah::linear_f32` computes (f32_gemm.c), in torch ops: x (M, K) float32 → (M, n), to float32 rounding."""
    panels, k, width = w.shape
    rows = w.permute(0, 2, 1).reshape(panels * width, k)[:n]  # (n, k): the packing undone
    return F.linear(x, rows, None if bias is None else bias[:n])


def reference_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """What `mynah::silu_mul` computes, in torch ops: silu(gate) * up of gate_up (N, 2I) = [gate | up]."""
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What `mynah::rms_norm` computes, in torch ops: transformers' LlamaRMSNorm on float32 (N, E)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
