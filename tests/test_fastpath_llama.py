"""The hand-written Llama-family decode path (engine.serving.fastpath.llama) against transformers' own.

Tiny random Llama (grouped-query attention, tied embeddings, rope_theta and linear rope
scaling from the config) and Qwen2 (q/k/v biases, untied head) models, saved as normal HF
folders with a byte-level BPE tokenizer and served by the real engine. fp32: exactly HF
`generate`'s greedy tokens, also for requests that join and leave a running batch. int8:
dynamic int8 quantizes each layer's input with one scale per call, so the fast path (a
right-padded prefill) may differ from transformers' int8 forward: ≥ 90 % teacher-forced
next-token agreement. No timings here.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from engine.model import load_model
from engine.serving.batcher import Engine
from engine.serving.fastpath import FastDecoder, kernels, pick_decoder
from engine.serving.sampling import SamplingParams
from tests.conftest import ENGLISH

PROMPTS = [[("user", t)] for t in ["hello there", "what do you like to do ?", "i live in a big city and i like it",
                                   "hi", "good night my dear friend , see you later", "do you have a dog ?"]]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
             initializer_range=0.3)


def build(folder: Path, family: str) -> Path:
    """A tiny random Llama or Qwen2 folder (config, weights, tokenizer), built in about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from engine.tokenizer import train_bpe_tokenizer

    torch.manual_seed(1)
    tok = train_bpe_tokenizer(ENGLISH * 4, vocab_size=300)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    if family == "llama":  # SmolLM2's kind: grouped-query attention, tied embeddings, its own rope base
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, **ids, num_key_value_heads=2, tie_word_embeddings=True,
                                             rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    else:  # Qwen2: biases on q/k/v, a separate output head
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, **ids, num_key_value_heads=1, tie_word_embeddings=False))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def folder(request, tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp(request.param) / "model", request.param)


def greedy(n: int) -> dict:
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0)


def hf_generate(loaded, turns, n: int) -> str:
    ids = loaded.fmt.context_ids(turns, 200)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=loaded.fmt.pad_id)
    return loaded.fmt.decode(out[0, len(ids):].tolist())


async def test_fp32_llama_fast_path_gives_hf_generates_greedy_tokens_with_rows_joining_and_leaving(folder):
    loaded = load_model(str(folder))
    assert pick_decoder(loaded.model, "auto").family == "llama"
    lengths = [6 + 5 * i for i in range(len(PROMPTS))]
    expected = [hf_generate(loaded, p, n) for p, n in zip(PROMPTS, lengths)]
    assert len(set(expected)) > 1  # the random model says different things to different prompts
    async with Engine(loaded, SamplingParams(finish_sentences=False), max_batch_size=4) as engine:
        async def late(i):
            await asyncio.sleep(0.02 * i)  # joins a batch that is already decoding; shorter ones leave first
            return (await engine.reply(PROMPTS[i], greedy(lengths[i]))).text

        got = await asyncio.gather(*[late(i) for i in range(len(PROMPTS))])
        alone = [(await engine.reply(p, greedy(n))).text for p, n in zip(PROMPTS, lengths)]
        assert engine._decoder.name == "fast"
    assert got == expected and alone == expected


def test_a_prefix_every_context_shares_counts_once_in_a_prefill_group():
    """A persona's system prompt runs once per group (packing.Packed), so the group budget counts it once:
    15 chats of 44 tokens sharing 24 are one group of 324 tokens run, not two."""
    import engine.serving.fastpath as fastpath

    prefix = list(range(100, 124))
    shared = [prefix + [i] * 20 for i in range(15)]
    assert [len(g) for g in fastpath.prefill_groups(shared, 384)] == [15]
    assert [len(g) for g in fastpath.prefill_groups(shared, 200)] == [8, 7]   # 24 + 8 x 20 = 184 tokens each at most
    unshared = [[i] + prefix + [i] * 19 for i in range(15)]
    assert [len(g) for g in fastpath.prefill_groups(unshared, 384)] == [8, 7]  # 44 tokens each, all run


async def test_a_burst_prefilled_in_groups_gives_transformers_greedy_tokens(folder, monkeypatch):
    """A burst's contexts are prefilled a group at a time (fastpath.prefill_groups), each group into its own
    cache rows; groups of one or two contexts here (a budget of 12 tokens) must give every chat exactly what
    transformers' generate gives it alone."""
    import engine.serving.fastpath as fastpath

    loaded = load_model(str(folder))
    lengths = [6 + 3 * i for i in range(len(PROMPTS))]
    expected = [hf_generate(loaded, p, n) for p, n in zip(PROMPTS, lengths)]
    contexts = [loaded.fmt.context_ids(p, 200) for p in PROMPTS]
    assert len(fastpath.prefill_groups(contexts, 12)) > 1 and len(fastpath.prefill_groups(contexts, 10_000)) == 1
    monkeypatch.setattr(fastpath, "PREFILL_CHUNK_TOKENS", 12)
    async with Engine(loaded, SamplingParams(finish_sentences=False), max_batch_size=8) as engine:
        got = await asyncio.gather(*[engine.reply(p, greedy(n)) for p, n in zip(PROMPTS, lengths)])
        assert engine._decoder.name == "fast"
    assert [r.text for r in got] == expected


def _teacher_forced_argmax(loaded, fast: bool, ids: list[int]) -> list[int]:
    """Next-token argmax after each prefix of `ids` (prefill of 4 tokens, then decode steps)."""
    decoder = pick_decoder(loaded.model, "auto" if fast else "off", pad_id=loaded.fmt.pad_id)
    with torch.inference_mode():
        state, logits = decoder.prefill([ids[:4]], [0])
        out = [int(logits.argmax())]
        for token in ids[4:]:
            out.append(int(decoder.decode(state, torch.tensor([token])).argmax()))
    return out


async def test_int8_llama_fast_path_agrees_with_transformers_int8_and_serves_a_batch(folder):
    loaded = load_model(str(folder), quantize="int8")
    assert isinstance(pick_decoder(loaded.model, "auto"), FastDecoder)
    agree = total = 0
    for turns in PROMPTS:
        ids = loaded.fmt.context_ids(turns + [("bot", "i like to read books"), ("user", "that is nice")], 200)
        fast, slow = _teacher_forced_argmax(loaded, True, ids), _teacher_forced_argmax(loaded, False, ids)
        agree += sum(a == b for a, b in zip(fast, slow))
        total += len(fast)
    assert total > 50 and agree / total >= 0.9
    async with Engine(loaded, SamplingParams(finish_sentences=False), max_batch_size=4) as engine:
        replies = await asyncio.gather(*[engine.reply(p, greedy(8)) for p in PROMPTS])
        assert engine._decoder.name == "fast"
    assert all(r.new_tokens == 8 and r.text for r in replies)


def test_llama_models_the_fast_path_does_not_serve_take_transformers_forward():
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    dynamic = LlamaForCausalLM(LlamaConfig(**small, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert pick_decoder(dynamic, "auto").name == "transformers"  # its rotary frequencies change with the length
    windowed = MistralForCausalLM(MistralConfig(**small, sliding_window=16))
    assert pick_decoder(windowed, "auto").name == "transformers"  # a window that binds within a chat's context
    mistral = MistralForCausalLM(MistralConfig(**small, sliding_window=4096))
    assert pick_decoder(mistral, "auto").family == "llama"
    assert pick_decoder(mistral, "off").name == "transformers"


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_fused_projections_give_exactly_each_layers_own_outputs(per_channel):
    from torch import nn

    from engine.serving.fastpath.linear import Linear, fuse
    from engine.serving.quantize import quantize_int8

    torch.manual_seed(3)
    parts = nn.ModuleList([nn.Linear(32, 48), nn.Linear(32, 16, bias=False), nn.Linear(32, 16)])
    parts = quantize_int8(parts, per_channel=per_channel)
    fused = fuse(list(parts))
    assert fused is not None and fuse([nn.Linear(32, 8), nn.Linear(32, 8)]) is None  # fp32 stays unfused
    x = torch.randn(5, 32)
    together = torch.cat([Linear(p)(x) for p in parts], dim=-1)
    assert torch.equal(fused(x), together)


def test_int8_fused_layers_are_held_once_and_transformers_forward_is_unchanged(folder, monkeypatch):
    """The fused q/k/v and gate/up calls replace the layers' own packed weights (issue 23, RSS):
    the model's layers become parts of the step's fused call, transformers' forward gives the
    same logits as before, and a second step on the same model reuses the fused calls."""
    from engine.serving.fastpath import linear
    from engine.serving.fastpath.linear import FusedPart
    from engine.serving.fastpath.llama import LlamaStep
    from engine.serving.quantize import weight_bytes

    loaded = load_model(str(folder), quantize="int8")
    model, ids = loaded.model, torch.tensor([[5, 17, 42, 9, 100, 7]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
    bytes_before = weight_bytes(model)
    packs = []
    fuse_int8 = linear._fuse_int8
    monkeypatch.setattr(linear, "_fuse_int8", lambda modules: packs.append(fuse_int8(modules)) or packs[-1])
    step = LlamaStep(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    parts = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
    assert all(isinstance(p, FusedPart) for p in parts)
    assert attn.q_proj.whole is packs[0] and mlp.up_proj.whole is packs[1] and len(packs) == 2 * len(model.model.layers)
    assert [len(layer.qkv) for layer in step.layers.layers] == [1, 1]  # one call each in the step
    assert not any(hasattr(p, "_packed_params") for p in parts)  # the layers' own int8 copies are gone
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, before)
    assert weight_bytes(model) == bytes_before
    assert LlamaStep.supports(model) == ""
    LlamaStep(model)
    assert len(packs) == 2 * len(model.model.layers)  # the second step packed nothing new: it calls the same fused weights



def test_int8_llama_keeps_its_kv_cache_in_float16_and_fp32_in_float32(folder, tiny_dialogpt):
    """The cache grows with chats × context (chat-template models read ≥ 1,024 tokens): half the bytes
    beside int8 weights; fp32 models keep fp32 (exact tokens); GPT-2 int8 is float16 where the float16
    kernel reads it (fastpath.kernels), float32 where only torch's slower float16 SDPA could."""
    sizes = {}
    for precision in ("none", "int8"):
        decoder = pick_decoder(load_model(str(folder), quantize=precision).model)
        with torch.inference_mode():
            state, _ = decoder.prefill([[5, 9, 13, 2, 40]] * 4, [0, 1, 2, 3], 8)
        sizes[precision] = (state.cache.buffer.dtype, state.cache.nbytes())
    assert sizes["none"][0] == torch.float32 and sizes["int8"][0] == torch.float16
    assert sizes["int8"][1] * 2 == sizes["none"][1]
    gpt2 = pick_decoder(load_model(str(tiny_dialogpt), quantize="int8").model)
    assert gpt2.step.new_cache().dtype == (torch.float16 if kernels.available() else torch.float32)
