"""The fast paths' layers compiled by TorchScript (engine/serving/fastpath/compiled.py) against the same
module run in Python: the same bits, for GPT-2 and the Llama family, fp32 (BLAS, and oneDNN-packed
with GELU fused) and int8; where TorchScript cannot compile them, Python serves them with a warning."""
from __future__ import annotations

import pytest
import torch

from engine.model import load_model
from engine.serving import quantize
from engine.serving.fastpath import kernels, onednn, pick_decoder
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


@pytest.mark.parametrize("weights", ["fp32", "packed", "native_f32", "int8"])
def test_compiled_layers_give_exactly_what_they_give_run_in_python(model_path, weights, monkeypatch, caplog):
    if weights == "packed":
        if not quantize._has_linear_pointwise():
            pytest.skip("torch without oneDNN's packed linear")
        monkeypatch.setattr(onednn, "fp32_packing", lambda: "onednn")
    if weights == "native_f32":
        if kernels.f32_why_not():
            pytest.skip(f"no fp32 kernel here: {kernels.f32_why_not()}")
        monkeypatch.setattr(onednn, "fp32_packing", lambda: "native")
    model = load_model(str(model_path), quantize="int8" if weights == "int8" else "none").model
    if weights in ("packed", "native_f32"):
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


RACE = """
import threading, torch
from transformers import GPT2Config, GPT2LMHeadModel
from engine.serving.fastpath.gpt2 import GPT2Step
models = [GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0,
                                     eos_token_id=0)).eval() for _ in range(4)]
start, compiled = threading.Barrier(4), []
def build(model):
    start.wait()
    compiled.append(isinstance(GPT2Step(model).layers, torch.jit.ScriptModule))
threads = [threading.Thread(target=build, args=(m,)) for m in models]
[t.start() for t in threads]
[t.join() for t in threads]
print(compiled)
"""


def test_engines_compiling_at_once_all_get_compiled_layers():
    """TorchScript registers a class after compiling it: two engines' workers compiling at once (a canary
    beside the bot, a test suite's leftover engine) each compiled it, the second under a mangled name, and
    its layers fell back to Python (seen 3 times out of 3 with four threads). A fresh process: the
    classes compile on first use."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[True, True, True, True]", out.stderr[-2000:]
