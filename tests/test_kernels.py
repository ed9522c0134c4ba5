"""The float16 decode-attention kernel (engine.serving.fastpath.kernels): its numbers against torch's
attention over the same cache, its bounds checks, that the op is native (no GIL in a compiled step),
its build (no secrets in the compiler's environment; a broken compiler falls back), and the fast
paths with and without it."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.model import load_model
from engine.serving.fastpath import kernels, pick_decoder

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernel unavailable here: {kernels.why_not()}")


def _case(rows: int, spare_rows: int, heads: int, kv_heads: int, columns: int, width: int, seed: int = 0):
    """A query per row and one layer's float16 cache with spare rows and columns, as the fast paths hold it."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(2, rows + spare_rows, kv_heads, columns, width, generator=g).half()
    q = torch.randn(rows, heads, width, generator=g)
    lengths = torch.randint(1, columns + 1, (rows,), generator=g)
    lengths[0], lengths[-1] = columns, 1  # a full row and a row that sees only its new column
    return q, buffer[0], buffer[1], lengths


def _reference(q, k, v, lengths, scale):
    """torch's attention on the same numbers in float32, each row masked past its length."""
    return kernels.reference(q, k, v, lengths, scale)


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,width,columns", [(4, 4, 64, 37), (6, 2, 16, 9), (9, 3, 64, 300), (2, 1, 8, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_gives_torchs_attention_over_the_float16_cache(heads, kv_heads, width, columns, threads):
    q, k, v, lengths = _case(5, 3, heads, kv_heads, columns, width)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # two threads: the rows are split between them
    try:
        out = torch.ops.mynah.decode_attention(q, k, v, lengths, 0.3)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, _reference(q, k, v, lengths, 0.3), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_the_kernel_reads_nothing_outside_the_cache():
    q, k, v, lengths = _case(3, 0, 4, 4, 10, 16)
    for bad in (0, 11, -5):
        wrong = lengths.clone()
        wrong[1] = bad
        with pytest.raises(RuntimeError, match="outside 1"):
            torch.ops.mynah.decode_attention(q, k, v, wrong, 1.0)
    op = torch.ops.mynah.decode_attention
    for args, says in [((q, k.float(), v.float(), lengths), "float16"),  # a float32 cache
                       ((q, k.transpose(2, 3), v.transpose(2, 3), lengths), "contiguous"),
                       ((torch.cat([q, q]), k, v, torch.cat([lengths, lengths])), "do not fit"),  # more rows than the cache
                       ((q, k, v, lengths.int()), "int64"),
                       ((q[:, :3], k, v, lengths), "do not fit")]:  # 3 query heads over 4 key heads
        with pytest.raises(RuntimeError, match=says):
            op(*args, 1.0)


@needs_kernel
def test_the_op_the_fast_paths_call_is_native_not_python():
    """A Python-implemented op takes the GIL on every layer of every step: while replies streamed, the
    event loop held it and a 16-chat burst took 1.38x as long (docs/BENCHMARKS.md, ninth pass)."""
    dump = torch._C._dispatch_dump("mynah::decode_attention")
    cpu = next(line for line in dump.splitlines() if line.startswith("CPU:"))
    assert "op.cpp" in cpu


@needs_kernel
@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_kernels_run_on_torchs_threads(threads):
    """Built with OpenMP, as torch's own loops are: built without it, at::parallel_for ran every kernel
    (int8 and fp32 linear layers, decode attention) on one thread whatever `[engine] threads` said."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.ops.mynah.kernel_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_the_kernel_is_built_by_a_compiler_that_sees_no_secrets(tmp_path, monkeypatch):
    seen = tmp_path / "compiler-env.txt"
    compiler = tmp_path / "cxx-spy"
    compiler.write_text(f"#!/bin/sh\nenv > {seen}\nexec g++ \"$@\"\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "123:secret-telegram")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    target = tmp_path / "kernels" / "decode_attention-test.so"
    kernels.build(str(compiler), target)
    env = seen.read_text()
    assert "secret" not in env and "PATH=" in env
    assert target.stat().st_size > 0 and not [p for p in target.parent.iterdir() if p != target]  # no half-built leftovers


@needs_kernel
def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, caplog):
    """-fopenmp refused (a compiler without OpenMP): built again without it, the kernels run on one thread."""
    compiler = tmp_path / "cxx-no-openmp"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option" >&2; exit 1; }; done\n'
                        'exec g++ "$@"\n')
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    target = tmp_path / "kernels" / "kernels-test.so"
    with caplog.at_level("WARNING", logger="engine.serving.fastpath.kernels"):
        kernels.build(str(compiler), target)
    assert target.stat().st_size > 0 and "without OpenMP" in caplog.text


def test_a_broken_compiler_or_the_switch_leaves_the_fast_paths_on_sdpa(tmp_path, monkeypatch, tiny_dialogpt):
    broken = tmp_path / "cxx-broken"
    broken.write_text("#!/bin/sh\necho 'c++: internal error' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CXX", str(broken))
    monkeypatch.setenv("MYNAH_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setattr(kernels, "_state", {})
    why = kernels.why_not()
    if kernels._cpu_has_flags():  # not an AVX2 x86-64 CPU: never built, said so
        assert "CPU" in why
    else:
        assert "could not build" in why and "internal error" in why
    decoder = pick_decoder(load_model(str(tiny_dialogpt), quantize="int8").model)
    assert decoder.step.new_cache().dtype == torch.float32 and not decoder.step.layers.kernel
    with torch.inference_mode():
        state, logits = decoder.prefill([[5, 9, 13], [7, 2]], [0, 1], 4)
        assert torch.isfinite(decoder.decode(state, logits.argmax(-1))).all()
    monkeypatch.setenv("MYNAH_KERNELS", "off")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.why_not() == "turned off (MYNAH_KERNELS=off)"


@needs_kernel
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_fast_paths_decode_through_the_kernel_as_sdpa_does_on_a_float32_cache(family, tiny_dialogpt, tmp_path):
    """Both fast paths, a float16 cache read by the kernel against the float32 cache read by SDPA: the
    same logits step after step up to the float16 rounding of keys and values (rows of different
    lengths; Llama's grouped-query heads). fp32 weights, so nothing but the cache and the attention
    call differs (int8's dynamic activation scales would magnify any rounding); a wrong head, row or
    length would move logits by whole units."""
    from tests.test_fastpath_llama import build

    path = tiny_dialogpt if family == "gpt2" else build(tmp_path / "llama", "llama")
    decoder = pick_decoder(load_model(str(path)).model)
    contexts, steps, logits = [[5, 9, 13, 2, 40, 7], [7, 2], [11, 3, 8, 30]], 6, {}
    for use in (True, False):
        decoder.step.layers.kernel = use
        decoder.step.kv_dtype = torch.float16 if use else torch.float32
        out = []
        with torch.inference_mode():
            state, first = decoder.prefill(contexts, [0, 1, 2], steps)
            tokens = first.argmax(-1)
            for step in range(steps):
                out.append(decoder.decode(state, tokens))
                tokens = out[-1].argmax(-1)
        logits[use] = torch.stack(out)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-2, rtol=1e-2)


def test_the_reference_is_what_the_kernel_computes():
    """The op's fallback where no native kernel loads: torch ops, checked bounds."""
    q, k, v, lengths = _case(4, 1, 6, 3, 12, 16, seed=3)
    naive = torch.empty_like(q)
    for r in range(4):  # attention written out, row by row and head by head
        for h in range(6):
            keys, values = k[r, h // 2, :lengths[r]].float(), v[r, h // 2, :lengths[r]].float()
            naive[r, h] = torch.softmax(keys @ q[r, h] * 0.25, 0) @ values
    torch.testing.assert_close(kernels.reference(q, k, v, lengths, 0.25), naive, atol=2e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="outside 1"):
        kernels.reference(q, k, v, lengths * 0, 0.25)


def test_a_damaged_kernel_file_falls_back_in_a_fresh_process(tmp_path):
    """The cached library is not a library (a disk error, a half-copied home folder): a starting bot says
    why, decodes on torch's SDPA, and the op still answers (through the reference)."""
    import subprocess

    code = """
from engine.serving.fastpath import kernels
path = kernels.library_path()
path.parent.mkdir(parents=True, exist_ok=True)
path.write_bytes(b"not a shared library")
print("WHY", kernels.why_not())
import torch
import torch.nn.functional as F
k = torch.ones(1, 1, 4, 8, dtype=torch.float16)
print("OUT", float(torch.ops.mynah.decode_attention(torch.ones(1, 1, 8), k, k * 2, torch.tensor([3]), 0.5).sum()))
"""
    env = dict(os.environ, MYNAH_KERNEL_DIR=str(tmp_path / "kernels"), PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    why = next(line for line in out.stdout.splitlines() if line.startswith("WHY"))
    assert "could not build or load" in why or "CPU" in why or "compiler" in why
    assert "OUT 16.0" in out.stdout  # every value row is 2s: attention gives 2 in each of 8 columns


@needs_kernel
def test_the_native_tanh_gelu_is_torchs_in_one_pass_in_place():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 301, generator=g) * 4  # not a multiple of 8: the tail runs too
    x[0, :8] = torch.tensor([-1e4, -100.0, -30.0, -1e-30, 0.0, 1e-30, 30.0, 1e4])  # both ends of e^(-2u)
    expected = F.gelu(x, approximate="tanh")
    y = x.clone()
    out = torch.ops.mynah.gelu_tanh_(y)
    assert out.data_ptr() == y.data_ptr()  # in place: the linear layer's fresh output, no second buffer
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(out).all()
    for bad in (x.t(), x.double()):  # not contiguous, not float32
        with pytest.raises(RuntimeError, match="contiguous float32"):
            torch.ops.mynah.gelu_tanh_(bad)
    torch.testing.assert_close(kernels.reference_gelu_tanh_(x.clone()), expected)


@needs_kernel
def test_int8_gpt2s_mlp_calls_the_native_gelu_and_fp32_keeps_torchs(tiny_dialogpt):
    int8 = pick_decoder(load_model(str(tiny_dialogpt), quantize="int8").model)
    fp32 = pick_decoder(load_model(str(tiny_dialogpt)).model)
    assert [b.fc.native_gelu for b in int8.step.layers.blocks] == [True] * len(int8.step.layers.blocks)
    assert not any(b.fc.native_gelu for b in fp32.step.layers.blocks)  # transformers' exact greedy tokens
