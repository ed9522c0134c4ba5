"""Serving without transformers (engine.lean) gives exactly what loading through transformers gives.

Tiny random Llama (tied head, linear rope), Qwen2 (q/k/v biases, untied head) and GPT-2 (DialoGPT
style) folders as transformers saves them: the lean load holds the same tensors and the same rotary table, the
engine's fp32 replies are transformers' `generate` greedy tokens and its int8 replies the same
as the int8 transformers-loaded model's; the tokenizer answers every call serving makes as
transformers' tokenizer does (a chat-template one and a DialoGPT-style one); a served reply
never imports transformers; what lean loading cannot hold loads through transformers.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.dialogue import DialogueFormat, detect_format, encode_plain
from engine.lean import LeanLoadError, LeanTokenizer, is_lean, lean_reason, load_lean
from engine.model import load_model
from engine.serving.batcher import Engine
from engine.serving.fastpath import pick_decoder
from engine.serving.sampling import SamplingParams
from tests.conftest import CHATML, ENGLISH, build_dialogpt_model
from tests.test_fastpath_llama import PROMPTS, build, greedy, hf_generate

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["hello there", "", "  two  spaces  ", "émoji 😀 and 中文 and ünïcödé", "a typed <|im_end|> and <|endoftext|> and <|im_start|>",
         "i like to read books " * 200, "\n\n\t tabs \n"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def folder(request, tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp(request.param) / "model"
    return build_dialogpt_model(where) if request.param == "gpt2" else build(where, request.param)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> Path:
    """The Llama folder with a ChatML tokenizer (its own control tokens, a chat template), as SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = build(tmp_path_factory.mktemp("chat") / "model", "llama")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(ENGLISH * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return folder


def _both_tokenizers(folder: Path):
    from transformers import AutoTokenizer

    return LeanTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("which", ["chat", "dialogpt"])
def test_the_lean_tokenizer_answers_every_serving_call_as_transformers_does(which, chat_folder, tmp_path):
    folder = chat_folder if which == "chat" else build(tmp_path / "model", "llama")
    lean, hf = _both_tokenizers(folder)
    assert lean_reason(str(folder)) == ""
    assert detect_format(lean) == detect_format(hf) == ("chat_template" if which == "chat" else "dialogpt")
    assert len(lean) == len(hf) and lean.get_vocab() == hf.get_vocab()
    assert set(lean.all_special_tokens) == set(hf.all_special_tokens)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "cls_token_id", "mask_token_id"):
        assert getattr(lean, name) == getattr(hf, name), name
    assert encode_plain(lean, TEXTS) == encode_plain(hf, TEXTS)
    assert encode_plain(lean, TEXTS[4]) == encode_plain(hf, TEXTS[4])
    ids = encode_plain(hf, TEXTS[3] + " " + TEXTS[4])
    specials = [hf.eos_token_id, hf.bos_token_id, hf.unk_token_id]
    for skip in (True, False):
        assert lean.decode(ids + specials, skip_special_tokens=skip) == hf.decode(ids + specials, skip_special_tokens=skip)
    fmt_lean, fmt_hf = DialogueFormat(lean), DialogueFormat(hf)
    turns = [("user", TEXTS[3]), ("bot", "i am fine <|im_end|>"), ("user", TEXTS[4])]
    for budget in (200, 12):
        assert fmt_lean.context_ids(turns, budget, "be kind") == fmt_hf.context_ids(turns, budget, "be kind")
    assert fmt_lean.dialogue_ids([t for _, t in turns]) == fmt_hf.dialogue_ids([t for _, t in turns])
    assert fmt_lean.stop_ids == fmt_hf.stop_ids and fmt_lean.banned_ids == fmt_hf.banned_ids
    assert fmt_lean.decode(ids) == fmt_hf.decode(ids)


def test_tokenizers_lean_loading_cannot_reproduce_load_through_transformers(chat_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(chat_folder, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert "tokenizer class" in lean_reason(str(copy))  # its class may rewrite the pre-tokenizer at load
    loaded = load_model(str(copy), lean=True)
    assert not is_lean(loaded.model) and type(loaded.tokenizer).__module__.startswith("transformers")


def test_the_lean_load_holds_transformers_tensors_and_rotary_table_bit_for_bit(folder):
    hf, lean = load_model(str(folder)), load_model(str(folder), lean=True)
    assert is_lean(lean.model) and not is_lean(hf.model)
    theirs = hf.model.state_dict()
    ours = lean.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    table = lean.model.get_submodule("transformer.wte" if hf.model.config.model_type == "gpt2" else "model.embed_tokens")
    assert (lean.model.lm_head.weight is table.weight) == hf.model.config.tie_word_embeddings
    if hf.model.config.model_type != "gpt2":
        positions, x = torch.arange(700)[None], torch.zeros(1)
        for a, b in zip(lean.model.model.rotary_emb(x, positions), hf.model.model.rotary_emb(x, positions)):
            assert torch.equal(a, b)


async def _replies(loaded, lengths, together: bool = True) -> list[str]:
    """The engine's replies to PROMPTS, joining a running batch (together) or one at a time: int8
    quantizes each call's rows with one scale, so its tokens depend on which rows share a step."""
    async with Engine(loaded, SamplingParams(finish_sentences=False), max_batch_size=4) as engine:
        async def late(i):
            await asyncio.sleep(0.02 * i)  # joins a running batch
            return (await engine.reply(PROMPTS[i], greedy(lengths[i]))).text

        if together:
            out = await asyncio.gather(*[late(i) for i in range(len(PROMPTS))])
        else:
            out = [(await engine.reply(p, greedy(n))).text for p, n in zip(PROMPTS, lengths)]
        assert engine._decoder.name == "fast"
    return list(out)


async def test_lean_served_replies_are_transformers_greedy_tokens_in_fp32_and_the_same_in_int8(folder):
    lengths = [6 + 5 * i for i in range(len(PROMPTS))]
    hf = load_model(str(folder))
    expected = [hf_generate(hf, p, n) for p, n in zip(PROMPTS, lengths)]
    assert len(set(expected)) > 1
    assert await _replies(load_model(str(folder), lean=True), lengths) == expected
    lean8, hf8 = load_model(str(folder), quantize="int8", lean=True), load_model(str(folder), quantize="int8")
    assert is_lean(lean8.model)
    assert await _replies(lean8, lengths, together=False) == await _replies(hf8, lengths, together=False)


def test_a_lean_model_is_served_by_the_fast_path_or_not_at_all(folder):
    lean = load_model(str(folder), lean=True)
    with pytest.raises(RuntimeError, match="without transformers"):
        pick_decoder(lean.model, "off")
    with pytest.raises(NotImplementedError, match="fast path"):
        lean.model(torch.tensor([[1, 2]]))


def test_a_reply_served_lean_never_imports_transformers(folder):
    """The point of lean loading: the serving process's RSS without transformers' ~1,000 modules."""
    code = (
        "import asyncio, json, sys\n"
        "from engine.model import load_model\n"
        "from engine.serving.batcher import Engine\n"
        "from engine.serving.sampling import SamplingParams\n"
        f"loaded = load_model({str(folder)!r}, quantize='int8', lean=True)\n"
        "async def main():\n"
        "    async with Engine(loaded, SamplingParams(max_new_tokens=6)) as engine:\n"
        "        return (await engine.reply([('user', 'hello there')])).new_tokens\n"
        "tokens = asyncio.run(main())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'sympy', 'accelerate')\n"
        "               or m.startswith('torch._dynamo'))\n"
        "print(json.dumps({'tokens': tokens, 'model': type(loaded.model).__name__, 'heavy': heavy}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"] in ("LeanLlama", "LeanGPT2") and result["tokens"] > 0
    assert result["heavy"] == []


def _rewrite_config(folder: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def test_what_lean_loading_cannot_hold_loads_through_transformers(llama_folder, tiny_chitchat, tmp_path):
    chitchat = load_model(str(tiny_chitchat), lean=True)  # an old config without model_type, a BERT vocab
    assert not is_lean(chitchat.model) and lean_reason(str(tiny_chitchat))
    llama3 = _rewrite_config(llama_folder, tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                               "original_max_position_embeddings": 64})
    assert "rope 'llama3'" in lean_reason(str(llama3))
    assert not is_lean(load_model(str(llama3), lean=True).model)


def test_weights_that_are_not_the_configs_are_refused_not_guessed(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = llama_folder
    wrong_shape = _rewrite_config(folder, tmp_path, intermediate_size=96)
    with pytest.raises(LeanLoadError, match="do not match"):
        load_lean(str(wrong_shape))
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    tensors = load_file(str(renamed / "model.safetensors"))
    tensors["model.layers.0.mlp.gate.weight"] = tensors.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(tensors, str(renamed / "model.safetensors"))
    with pytest.raises(LeanLoadError, match="not as expected"):
        load_lean(str(renamed))


def test_serving_config_decides_lean_loading():
    import dataclasses

    from bots.config import Config

    config = Config()
    assert config.serves_lean()
    assert not dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_path="off")).serves_lean()
    assert not dataclasses.replace(config, engine=dataclasses.replace(config.engine, backend="openai")).serves_lean()
    assert not dataclasses.replace(config, generation=dataclasses.replace(config.generation, mmi_model="x")).serves_lean()


def _adapter(base: Path, where: Path, **config_changes) -> Path:
    """A LoRA adapter on `base` as the learning loop saves one, with random (not zero) matrices."""
    from engine.training.lora import LoraSettings, wrap

    torch.manual_seed(3)
    wrapped = wrap(load_model(str(base)).model, LoraSettings(), str(base))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    wrapped.save_pretrained(str(where))
    if config_changes:
        config = json.loads((where / "adapter_config.json").read_text())
        (where / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return where


async def test_a_lora_adapter_is_merged_lean_exactly_as_peft_merges_it(folder, tmp_path):
    adapter = _adapter(folder, tmp_path / "adapter")
    peft_merged, lean = load_model(str(adapter)), load_model(str(adapter), lean=True)
    assert is_lean(lean.model) and not is_lean(peft_merged.model)
    theirs, ours = peft_merged.model.state_dict(), lean.model.state_dict()
    assert set(ours) == set(theirs)
    before = load_model(str(folder), lean=True).model.state_dict()
    changed = [n for n in ours if not torch.equal(ours[n], before[n])]
    assert changed and all(torch.equal(ours[n], theirs[n]) for n in ours)
    lengths = [8] * len(PROMPTS)
    assert await _replies(lean, lengths, together=False) == await _replies(peft_merged, lengths, together=False)


def test_an_adapter_lean_merging_cannot_reproduce_loads_through_peft(llama_folder, tmp_path):
    adapter = _adapter(llama_folder, tmp_path / "rslora", use_rslora=True)
    assert "use_rslora" in lean_reason(str(adapter), str(llama_folder))
    assert not is_lean(load_model(str(adapter), lean=True).model)
