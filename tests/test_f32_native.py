"""Mynah's fp32 linear kernel (fastpath/kernels/f32_gemm.c, engine.serving.f32_native): its numbers against
torch's, a row's outputs the same bits whatever shares its call, the packing undone exactly, stacked layers,
hostile inputs, and that fast-path fp32 models are packed for it on every CPU but Intel's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.serving import f32_native
from engine.serving.f32_native import NativeF32Linear, stacked
from engine.serving.fastpath import kernels, onednn

needs_f32_kernel = pytest.mark.skipif(bool(kernels.f32_why_not()), reason=f"fp32 kernel unavailable here: {kernels.f32_why_not()}")
SHAPES = [(768, 768, 1, True), (100, 37, 5, False), (2304, 64, 17, True), (3, 5, 3, True), (130, 1536, 300, False),
          (64, 8, 0, True), (49, 128, 4, False)]


def _layer(out_features: int, in_features: int, bias: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, NativeF32Linear]:
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    return weight, b, NativeF32Linear(weight, b)


@pytest.mark.parametrize("out_features,in_features,rows,bias", SHAPES)
def test_the_packing_round_trips_and_the_reference_is_torchs_linear(out_features, in_features, rows, bias):
    weight, b, layer = _layer(out_features, in_features, bias)
    assert torch.equal(layer.unpacked_weight(), weight)
    assert layer.weight_bytes() == 4 * (weight.numel() + (out_features if bias else 0))
    x = torch.randn(rows, in_features)
    got = kernels.reference_linear_f32(x, layer.packed, layer.bias_padded, out_features)
    torch.testing.assert_close(got, F.linear(x, weight, b))


@needs_f32_kernel
@pytest.mark.parametrize("out_features,in_features,rows,bias", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_native_kernel_gives_torchs_numbers(out_features, in_features, rows, bias, threads):
    """To fp32 rounding (the sums run in another order than MKL's), for 0 to 300 rows, outputs that are not a
    multiple of the 16-column panel, odd input widths, with and without a bias, on one thread and two."""
    weight, b, layer = _layer(out_features, in_features, bias)
    x = torch.randn(rows, in_features)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = layer(x)
    finally:
        torch.set_num_threads(before)
    exact = (x.double() @ weight.double().t() + (b.double() if bias else 0)).float()
    assert got.shape == (rows, out_features)
    torch.testing.assert_close(got, exact, atol=1e-4 * in_features ** 0.5, rtol=1e-4)


@needs_f32_kernel
def test_a_rows_outputs_are_the_same_bits_whatever_shares_its_call():
    """Each output is one chain over the inputs in order: a row alone, in a batch of 7 (a 4-row tile and a
    3-row one) and in a batch of 300 gives the same bits, so a chat's reply does not depend on its batch."""
    _, _, layer = _layer(200, 96, True)
    rows = torch.randn(300, 96)
    whole = layer(rows)
    for i in (0, 3, 5, 6, 299):
        assert torch.equal(layer(rows[i:i + 1]), whole[i:i + 1])
    assert torch.equal(layer(rows[:7]), whole[:7])


@needs_f32_kernel
def test_leading_dimensions_and_other_dtypes_are_taken():
    weight, b, layer = _layer(40, 24, True)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    got = layer(x)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x.float(), weight, b), atol=1e-4, rtol=1e-4)


@needs_f32_kernel
def test_hostile_inputs_get_a_clear_error_not_a_crash():
    _, _, layer = _layer(40, 24, False)
    with pytest.raises(RuntimeError, match="x's width or n does not fit"):
        torch.ops.mynah.linear_f32(torch.randn(2, 23), layer.packed, None, 40)
    with pytest.raises(RuntimeError, match="x's width or n does not fit"):
        torch.ops.mynah.linear_f32(torch.randn(2, 24), layer.packed, None, 49)
    with pytest.raises(RuntimeError, match="packed float32"):
        torch.ops.mynah.linear_f32(torch.randn(2, 24), layer.packed.double(), None, 40)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.mynah.linear_f32(torch.randn(2, 24), layer.packed, torch.zeros(40), 40)
    nan = layer(torch.full((1, 24), float("nan")))
    assert bool(nan.isnan().all())  # garbage in, garbage out: no crash


@needs_f32_kernel
def test_stacked_layers_give_each_layers_own_outputs():
    parts = [_layer(n, 32, bias, seed) for seed, (n, bias) in enumerate([(48, True), (16, False), (33, True)])]
    whole = stacked([w for w, _, _ in parts], [b for _, b, _ in parts])
    x = torch.randn(5, 32)
    y = whole(x)
    start = 0
    for _, _, layer in parts:
        assert torch.equal(y[:, start:start + layer.out_features], layer(x))
        start += layer.out_features


@needs_f32_kernel
def test_a_head_packed_in_blocks_is_the_same_layer():
    table = torch.randn(70, 24)
    blocks = NativeF32Linear(None, None, shape=(70, 24))
    for start in range(0, 70, 32):
        blocks.fill(start, table[start:start + 32])
    assert torch.equal(blocks.unpacked_weight(), table)
    x = torch.randn(3, 24)
    assert torch.equal(blocks(x), NativeF32Linear(table, None)(x))


def test_the_switch_and_the_vendor_choose_the_packing(monkeypatch):
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: False)
    assert onednn.fp32_packing() == ""  # Intel: MKL keeps the weights as loaded
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    monkeypatch.setenv("MYNAH_F32_KERNEL", "off")
    assert onednn.fp32_packing() == "onednn" and "MYNAH_F32_KERNEL=off" in kernels.f32_why_not()
    monkeypatch.delenv("MYNAH_F32_KERNEL")
    assert onednn.fp32_packing() == ("native" if not kernels.why_not() else "onednn")


def test_pack_rows_is_a_multiple_of_the_panel():
    assert f32_native.PACK_ROWS % f32_native.PANEL == 0
