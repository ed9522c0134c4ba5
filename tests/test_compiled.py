"""The fast paths' layers compiled by TorchScript (engine/serving/fastpath/compiled.py) against the same
module run in Python: the same bits, for GPT-2 and the Llama family, fp32 (BLAS, and oneDNN-packed
with GELU fused) and int8; where TorchScript cannot compile them, Python serves them with a warning."""
from __future__ import annotations

import pytest
import torch

from engine.model import load_model
from engine.serving import quantize
from engine.serving.fastpath import onednn, pick_decoder
from tests.test_fastpath_llama import build

CONTEXTS = [[5, 9, 13, 2, 40], [7, 3, 11, 4, 6, 8, 21, 30]]


@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2"])
def model_path(request, tiny_dialogpt, tmp_path_factory):
    return tiny_dialogpt if request.param == "gpt2" else build(tmp_path_factory.mktemp(request.param) / "m", request.param)


def _outputs(decoder) -> list[torch.Tensor]:
    """A prefill's logits and five greedy steps' for two rows of different lengths (the mask at work)."""
    with torch.inference_mode():
        state, logits = decoder.prefill(CONTEXTS, [0, 1], 6)
        out = [logits]
        for _ in range(5):
            out.append(decoder.decode(state, out[-1].argmax(-1)))
    return out


@pytest.mark.parametrize("weights", ["fp32", "packed", "int8"])
def test_compiled_layers_give_exactly_what_they_give_run_in_python(model_path, weights, monkeypatch, caplog):
    if weights == "packed":
        if not quantize._has_linear_pointwise():
            pytest.skip("torch without oneDNN's packed linear")
        monkeypatch.setattr(onednn, "onednn_is_faster", lambda: True)
    model = load_model(str(model_path), quantize="int8" if weights == "int8" else "none").model
    if weights == "packed":
        assert onednn.pack_if_faster(model) > 0
    compiled = pick_decoder(model)
    assert compiled.name == "fast" and isinstance(compiled.step.layers, torch.jit.ScriptModule)

    def no_torchscript(obj, *args, **kwargs):
        raise RuntimeError("this torch cannot compile it")

    monkeypatch.setattr(torch.jit, "script", no_torchscript)
    with caplog.at_level("WARNING", logger="engine.serving.fastpath.compiled"):
        plain = pick_decoder(model)
    assert not isinstance(plain.step.layers, torch.jit.ScriptModule) and "not compiled by TorchScript" in caplog.text
    for got, want in zip(_outputs(compiled), _outputs(plain)):
        assert torch.equal(got, want)
