"""Mynah's int8 linear kernel (fastpath/kernels/int8_gemm.c, engine.serving.int8_native): its numbers
against the reference and against fp32, each row quantized on its own (a chat's outputs do not
depend on its batch-mates), the packing undone exactly, fused layers, hostile inputs, and that
loading picks it where it builds (VNNI or AVX2, every ISA the same bits) and fbgemm elsewhere."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from engine.serving import int8_native, quantize
from engine.serving.fastpath import kernels
from engine.serving.int8_native import NativeInt8Linear, from_dynamic, stacked

needs_int8_kernel = pytest.mark.skipif(bool(kernels.int8_why_not()),
                                       reason=f"int8 kernel unavailable here: {kernels.int8_why_not()}")


def _dynamic(out_features: int, in_features: int, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, nn.Module]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.qconfig = per_channel_dynamic_qconfig
    return linear, DynamicInt8Linear.from_float(linear)


def _op(layer: NativeInt8Linear, x: torch.Tensor, native: bool) -> torch.Tensor:
    args = (x, layer.packed, layer.w_sum, layer.w_scale, layer.bias_padded, layer.out_features)
    return torch.ops.mynah.linear_u8s8(*args) if native else kernels.reference_linear_u8s8(*args)


@pytest.mark.parametrize("out_features,in_features,rows,bias",
                         [(576, 576, 1, True), (100, 37, 5, False), (960, 64, 17, True), (3, 5, 3, True),
                          (130, 1536, 300, False), (64, 8, 0, True)])
def test_the_layer_is_the_int8_weights_times_each_row_quantized(out_features, in_features, rows, bias):
    """The packing round-trips fbgemm's int8 rows exactly, and the layer's outputs are those rows times
    the inputs to within 8-bit input quantization (half a step per input, at most)."""
    linear, dynamic = _dynamic(out_features, in_features, bias)
    layer = from_dynamic(dynamic)
    weight, scales, b = layer.rows()
    assert torch.equal(weight, dynamic.weight().int_repr()) and torch.equal(scales, dynamic.weight().q_per_channel_scales().float())
    assert (b is None) == (not bias) and (b is None or torch.equal(b, linear.bias.detach()))
    x = torch.randn(rows, in_features) * 3
    got = _op(layer, x, native=False)
    dequantized = weight.float() * scales[:, None]
    exact = x @ dequantized.t() + (linear.bias.detach() if bias else 0)
    step = (x.amax(1).clamp(min=0) - x.amin(1).clamp(max=0)) / 255  # each row's quantization step
    bound = 0.5 * step[:, None] * dequantized.abs().sum(1)[None, :] + 1e-4
    assert got.shape == (rows, out_features) and bool((got - exact).abs().le(bound).all())


@needs_int8_kernel
@pytest.mark.parametrize("out_features,in_features,rows,bias",
                         [(576, 576, 1, True), (100, 37, 5, False), (960, 64, 17, True), (3, 5, 3, True),
                          (130, 1536, 300, False), (64, 8, 0, True), (200, 128, 48, True), (64, 576, 33, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_native_kernel_gives_the_references_numbers(out_features, in_features, rows, bias, threads):
    """VNNI for a few rows; AMX, where the CPU has it, for each block of 16 rows when the inputs are a
    multiple of 64 wide (17, 33, 48, 300 rows: blocks in pairs, an odd block, the rows left to VNNI)."""
    _, dynamic = _dynamic(out_features, in_features, bias, seed=1)
    layer = from_dynamic(dynamic)
    x = torch.randn(rows, in_features) * 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _op(layer, x, native=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, _op(layer, x, native=False), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_int8_kernel), False])
def test_a_rows_outputs_do_not_depend_on_its_batch_mates(native):
    """fbgemm quantizes a whole call with one scale, so a chat's numbers moved with who else was in the
    batch; here each row has its own."""
    _, dynamic = _dynamic(192, 96)
    layer = from_dynamic(dynamic)
    lone = torch.randn(1, 96)
    loud = torch.randn(6, 96) * 50  # batch-mates with far larger activations
    together = _op(layer, torch.cat([loud[:3], lone, loud[3:]]), native)
    assert torch.equal(together[3:4], _op(layer, lone, native))


@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_int8_kernel), False])
def test_hostile_rows_give_numbers_not_crashes(native):
    """An all-zero row gives the bias; a row with NaN or inf gives whatever it gives, without a crash,
    and leaves the other rows alone."""
    linear, dynamic = _dynamic(64, 32)
    layer = from_dynamic(dynamic)
    x = torch.randn(4, 32)
    x[0] = 0
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    y = _op(layer, x, native)
    torch.testing.assert_close(y[0], linear.bias.detach())
    assert torch.equal(y[3], _op(layer, x[3:], native)[0])


@needs_int8_kernel
def test_the_op_refuses_what_does_not_fit_its_weights_with_a_clear_message():
    _, dynamic = _dynamic(64, 32)
    layer = from_dynamic(dynamic)
    with pytest.raises(RuntimeError, match="x's width or n does not fit w"):
        torch.ops.mynah.linear_u8s8(torch.randn(2, 40), layer.packed, layer.w_sum, layer.w_scale, None, 64)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.mynah.linear_u8s8(torch.randn(2, 32).double(), layer.packed, layer.w_sum, layer.w_scale, None, 64)


def test_stacked_layers_give_each_layers_own_outputs():
    """q/k/v and gate/up run as one call (fastpath.linear.fuse): each output is exactly its layer's."""
    layers = [from_dynamic(_dynamic(n, 48, seed=n)[1]) for n in (48, 16, 16)]
    whole = stacked(layers)
    x = torch.randn(5, 48)
    together = whole(x)
    assert torch.equal(together, torch.cat([layer(x) for layer in layers], 1))
    assert whole.weight_bytes() == sum(layer.weight_bytes() for layer in layers)


def test_weights_with_zero_points_stay_on_fbgemm():
    """The kernel takes symmetric int8 weights (quantize_int8's); an affine one is left as it is."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    weight = torch.quantize_per_tensor(linear.weight.detach(), 0.01, 3, torch.qint8)
    dynamic = DynamicInt8Linear(8, 8)
    dynamic.set_weight_bias(weight, linear.bias.detach())
    assert from_dynamic(dynamic) is None


def test_loading_picks_the_kernel_where_it_runs_and_fbgemm_elsewhere(monkeypatch):
    model = nn.Sequential(nn.Linear(24, 50), nn.ReLU(), nn.Linear(50, 8))
    quantized = quantize.quantize_int8(model)
    kinds = {type(m) for m in quantized.modules()} & {NativeInt8Linear, DynamicInt8Linear}
    assert kinds == ({DynamicInt8Linear} if kernels.int8_why_not() else {NativeInt8Linear})

    monkeypatch.setattr(int8_native, "int8_why_not", lambda: "no C++ compiler here")
    monkeypatch.setattr(quantize, "CHUNK_ROWS_ABOVE", 100)  # the block-of-rows path too
    quantized = quantize.quantize_int8(nn.Sequential(nn.Linear(24, 50), nn.ReLU(), nn.Linear(50, 8)))
    assert {type(m) for m in quantized.modules()} & {NativeInt8Linear, DynamicInt8Linear} == {DynamicInt8Linear}


@needs_int8_kernel
def test_the_block_of_rows_path_makes_the_same_layer_as_from_float(monkeypatch):
    """The output head is quantized a block of rows at a time (no fbgemm pack made): the same rows and
    scales as torch's from_float."""
    linear, dynamic = _dynamic(150, 24)
    monkeypatch.setattr(quantize, "CHUNK_ROWS", 16)  # rounded up to whole panels: blocks of 64, 64 and 22 rows
    got = quantize._int8_in_chunks(linear)
    expect = from_dynamic(dynamic)
    assert isinstance(got, NativeInt8Linear)
    for a, b in zip(got.rows(), expect.rows()):
        assert torch.equal(a, b)


@needs_int8_kernel
@pytest.mark.parametrize("out_features,in_features,rows", [(203, 128, 48), (77, 130, 5), (64, 576, 1), (3, 8, 17)])
def test_both_packings_give_the_same_bits(out_features, in_features, rows, monkeypatch):
    """Weights packed 64 columns wide (VNNI's panels; on a CPU without VNNI the AVX2 path reads them a
    strip at a time) and 16 wide (AVX2's own): the same rows back and the same output bits."""
    torch.manual_seed(5)
    weights = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    scales, bias, x = torch.rand(out_features) / 100, torch.randn(out_features), torch.randn(rows, in_features) * 3
    layers = {}
    for width, vnni in ((64, True), (16, False)):
        monkeypatch.setattr(int8_native, "int8_vnni", lambda vnni=vnni: vnni)
        layers[width] = NativeInt8Linear(weights, scales, bias)
        assert layers[width].packed.shape[2] == width and torch.equal(layers[width].rows()[0], weights)
    assert torch.equal(layers[64](x), layers[16](x))


ISA_PROBE = """
import torch
from engine.serving.int8_native import NativeInt8Linear
torch.manual_seed(3)
outs = []
for n, k, m in ((203, 128, 48), (77, 130, 5), (64, 576, 1)):  # AMX blocks, odd widths (masked tails), one row
    rows, scales, x = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) / 100, torch.randn(m, k) * 3
    outs.append(NativeInt8Linear(rows, scales, torch.randn(n))(x))
torch.save(outs, OUT)
"""


@needs_int8_kernel
@pytest.mark.parametrize("switch", ["MYNAH_AMX", "MYNAH_VNNI"])
def test_every_instruction_set_gives_the_same_bits(tmp_path, switch):
    """The kernel takes AMX for blocks of 16 rows and VNNI for the rest where the CPU has them, AVX2
    elsewhere (AMD before Zen 4). `MYNAH_AMX=off` keeps VNNI and `MYNAH_VNNI=off` takes AVX2 (a fresh
    process: the choice is made once); integer sums are exact on each, and the scaling is the same."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    here, there = tmp_path / "here.pt", tmp_path / "there.pt"
    out = subprocess.run([sys.executable, "-c", ISA_PROBE.replace("OUT", repr(str(there)))], capture_output=True,
                         text=True, timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root), switch: "off"})
    assert out.returncode == 0, out.stderr[-2000:]
    exec(ISA_PROBE.replace("OUT", repr(str(here))), {})
    for a, b in zip(torch.load(here), torch.load(there), strict=True):
        assert torch.equal(a, b)
