"""fp32 fast-path layers packed where the CPU's vendor says MKL is the slower (engine/serving/fastpath/onednn.py), for
Mynah's fp32 kernel or oneDNN: the same logits, a tied head packed from its memory-mapped table (held once), and
nothing packed where MKL is kept."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine import cpu
from engine.model import load_model
from engine.serving import quantize
from engine.serving.batcher import Engine
from engine.serving.f32_native import NativeF32Linear
from engine.serving.fastpath.linear import FusedPart
from engine.serving.file_rows import FileRows
from engine.serving.fastpath import kernels, onednn, pick_decoder
from engine.serving.sampling import SamplingParams
from tests.test_fastpath_llama import build

pytestmark = pytest.mark.skipif(not quantize._has_linear_pointwise(), reason="torch without oneDNN's packed linear")
CONTEXTS = [[5, 9, 13, 2], [7, 3, 11, 4, 6, 8]]


PACKINGS = ["onednn", pytest.param("native", marks=pytest.mark.skipif(bool(kernels.f32_why_not()), reason="no fp32 kernel"))]
LAYER = {"onednn": quantize.PackedLinear, "native": NativeF32Linear}
HEAD = {"onednn": quantize.PackedHead, "native": NativeF32Linear}


@pytest.fixture(params=PACKINGS)
def packing(request, monkeypatch):
    """Which packing the test's models get (onednn.fp32_packing): Mynah's kernel where it builds, and oneDNN."""
    monkeypatch.setattr(onednn, "fp32_packing", lambda: request.param)
    return request.param


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request, tiny_dialogpt, tmp_path_factory):
    return tiny_dialogpt if request.param == "gpt2" else build(tmp_path_factory.mktemp("llama") / "m", "llama")


def _logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = pick_decoder(model)
    assert decoder.name == "fast"
    with torch.inference_mode():
        state, first = decoder.prefill(CONTEXTS, [0, 1], 4)
        return first, decoder.decode(state, torch.tensor([1, 2]))


def test_packed_layers_and_tied_head_give_the_same_logits(model_path, packing, monkeypatch):
    monkeypatch.setattr(quantize, "HEAD_BLOCK_ROWS", 100)  # several blocks even for a tiny vocabulary
    monkeypatch.setattr("engine.serving.f32_native.PACK_ROWS", 96)
    model = load_model(str(model_path)).model
    before = _logits(model)
    table = model.get_input_embeddings().weight
    assert quantize.file_backed(table)  # the safetensors checkpoint, memory-mapped
    ids = torch.tensor([CONTEXTS[1]])
    with torch.inference_mode():
        hf_before = model(ids).logits
    packed = onednn.pack_if_faster(model)
    head = model.get_output_embeddings()
    assert isinstance(head, HEAD[packing])
    if packing == "onednn":
        assert len(head.blocks) == -(-table.shape[0] // 100)
    else:
        assert torch.equal(head.unpacked_weight(), table)
    fused = {id(m.whole) for m in model.modules() if isinstance(m, FusedPart)}  # Llama: q/k/v and gate/up, one call each
    assert len(fused) == (2 * model.config.num_hidden_layers if model_path.name == "m" else 0)
    layers = sum(isinstance(m, LAYER[packing]) for m in model.modules() if m is not head)
    assert layers and packed == layers + len(fused) + 1
    with torch.inference_mode():  # transformers' forward through the packed and fused layers: the same logits
        torch.testing.assert_close(model(ids).logits, hf_before, atol=1e-4, rtol=1e-4)
    embed = model.get_input_embeddings()  # looked up by reading rows from the file (outside RSS), not copied
    assert isinstance(embed, FileRows) and embed.weight is table and quantize.file_backed(table)
    for got, want in zip(_logits(model), before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    hidden = torch.randn(2, 3, head.in_features)  # transformers' forward through the model gets the same head
    torch.testing.assert_close(head(hidden), hidden @ table.T, atol=1e-4, rtol=1e-4)


def test_a_tied_head_in_anonymous_memory_is_not_packed_twice(model_path, packing):
    model = load_model(str(model_path)).model
    embed = model.get_input_embeddings()
    embed.weight.data = embed.weight.data.clone()  # e.g. a .bin checkpoint: the table is in anonymous memory
    assert onednn.pack_if_faster(model) > 0
    assert model.get_output_embeddings().weight is embed.weight


def test_nothing_is_packed_where_the_vendor_says_mkl_is_faster(model_path, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: False)
    assert onednn.fp32_packing() == ""
    model = load_model(str(model_path)).model
    assert onednn.pack_if_faster(model) == 0
    assert not any(isinstance(m, (quantize.PackedLinear, NativeF32Linear)) for m in model.modules())


def test_the_engine_serves_a_packed_fast_path(model_path, packing):
    loaded = load_model(str(model_path))

    async def run():
        async with Engine(loaded, SamplingParams(max_new_tokens=6)) as engine:
            reply = await engine.reply([("user", "hello there")])
            return reply, engine._decoder.name

    reply, decoder = asyncio.run(run())
    assert decoder == "fast" and loaded.packed and reply.text.strip()
    assert any(isinstance(m, LAYER[packing]) for m in loaded.model.modules())


def test_a_lean_model_is_packed_and_served_as_transformers_one_is(model_path, packing):
    """`mynah run` serves lean models (engine.lean); on every CPU but Intel's their fp32 layers and
    tied head are packed too (a missing get_input_embeddings once killed the engine thread there)."""
    before = _logits(load_model(str(model_path), lean=True).model)
    loaded = load_model(str(model_path), lean=True)
    assert getattr(loaded.model, "lean", False)

    async def run():
        async with Engine(loaded, SamplingParams(max_new_tokens=6)) as engine:
            return await engine.reply([("user", "hello there")])

    assert asyncio.run(run()).text.strip() and loaded.packed
    assert isinstance(loaded.model.get_output_embeddings(), HEAD[packing])
    assert isinstance(loaded.model.get_input_embeddings(), FileRows)
    for got, want in zip(_logits(loaded.model), before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("vendor, packs", [("GenuineIntel", False), ("AuthenticAMD", True), ("unknown", True)])
def test_the_cpu_vendor_decides_where_mkl_keeps_fp32(vendor, packs, monkeypatch):
    monkeypatch.setattr(cpu, "vendor", lambda: vendor)
    onednn.onednn_is_faster.cache_clear()
    try:
        assert onednn.onednn_is_faster() is packs
    finally:
        onednn.onednn_is_faster.cache_clear()


def test_pack_weights_false_in_the_config_serves_the_layers_as_loaded(tiny_dialogpt, packing):
    from bots.app import build_engine
    from bots.config import ConfigError, parse_config

    config = parse_config({"engine": {"pack_weights": False}})
    loaded = load_model(str(tiny_dialogpt))

    async def run():
        async with build_engine(config, loaded) as engine:
            return (await engine.reply([("user", "hello there")])).text

    assert asyncio.run(run()).strip()
    assert not any(isinstance(m, (quantize.PackedLinear, NativeF32Linear)) for m in loaded.model.modules())
    with pytest.raises(ConfigError, match="pack_weights"):
        parse_config({"engine": {"pack_weights": "yes"}})
