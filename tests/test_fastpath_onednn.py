"""fp32 fast-path layers packed for oneDNN where a probe finds it faster (engine/serving/fastpath/onednn.py):
the same logits, the tied head left alone, and nothing packed where the probe says no."""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine.model import load_model
from engine.serving import quantize
from engine.serving.batcher import Engine
from engine.serving.fastpath import onednn, pick_decoder
from engine.serving.sampling import SamplingParams
from tests.test_fastpath_llama import build

pytestmark = pytest.mark.skipif(not quantize._has_linear_pointwise(), reason="torch without oneDNN's packed linear")
CONTEXTS = [[5, 9, 13, 2], [7, 3, 11, 4, 6, 8]]


@pytest.fixture(params=["gpt2", "llama"])
def model_path(request, tiny_dialogpt, tmp_path_factory):
    return tiny_dialogpt if request.param == "gpt2" else build(tmp_path_factory.mktemp("llama") / "m", "llama")


def _logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    decoder = pick_decoder(model)
    assert decoder.name == "fast"
    with torch.inference_mode():
        state, first = decoder.prefill(CONTEXTS, [0, 1], 4)
        return first, decoder.decode(state, torch.tensor([1, 2]))


def test_packed_layers_give_the_same_logits_and_leave_the_tied_head(model_path, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    model = load_model(str(model_path)).model
    before = _logits(model)
    head = model.get_output_embeddings()
    packed = onednn.pack_if_faster(model)
    assert packed > 0 and sum(isinstance(m, quantize.PackedLinear) for m in model.modules()) == packed
    assert model.get_output_embeddings() is head and not isinstance(head, quantize.PackedLinear)
    for got, want in zip(_logits(model), before):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_nothing_is_packed_where_the_probe_says_mkl_is_faster(model_path, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: False)
    model = load_model(str(model_path)).model
    assert onednn.pack_if_faster(model) == 0
    assert not any(isinstance(m, quantize.PackedLinear) for m in model.modules())


def test_the_engine_serves_a_packed_fast_path(model_path, monkeypatch):
    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    loaded = load_model(str(model_path))

    async def run():
        async with Engine(loaded, SamplingParams(max_new_tokens=6)) as engine:
            reply = await engine.reply([("user", "hello there")])
            return reply, engine._decoder.name

    reply, decoder = asyncio.run(run())
    assert decoder == "fast" and loaded.packed and reply.text.strip()
    assert any(isinstance(m, quantize.PackedLinear) for m in loaded.model.modules())


@pytest.mark.parametrize("vendor, packs", [("GenuineIntel", False), ("AuthenticAMD", True), ("unknown", True)])
def test_the_cpu_vendor_decides_where_mkl_keeps_fp32(vendor, packs, monkeypatch):
    monkeypatch.setattr(onednn, "_cpu_vendor", lambda: vendor)
    onednn.onednn_is_faster.cache_clear()
    try:
        assert onednn.onednn_is_faster() is packs
    finally:
        onednn.onednn_is_faster.cache_clear()


def test_pack_weights_false_in_the_config_serves_the_layers_as_loaded(tiny_dialogpt, monkeypatch):
    from bots.app import build_engine
    from bots.config import ConfigError, parse_config

    monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    config = parse_config({"engine": {"pack_weights": False}})
    loaded = load_model(str(tiny_dialogpt))

    async def run():
        async with build_engine(config, loaded) as engine:
            return (await engine.reply([("user", "hello there")])).text

    assert asyncio.run(run()).strip()
    assert not any(isinstance(m, quantize.PackedLinear) for m in loaded.model.modules())
    with pytest.raises(ConfigError, match="pack_weights"):
        parse_config({"engine": {"pack_weights": "yes"}})
