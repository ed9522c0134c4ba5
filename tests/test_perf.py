"""Performance work: vectorized sampling, shared prefills, int8, overload, and `mynah bench --quick`.

No test here asserts a speed: timings on shared CI machines are noise. `mynah bench` measures.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.serving.batcher import Engine
from engine.model import load_model
from engine.serving.sampling import BatchSampler, RowSampler, SamplingParams, next_tokens

ROOT = Path(__file__).resolve().parents[1]
GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10, repetition_penalty=1.0)
PROMPTS = [[("user", t)] for t in ["hello there", "what do you like to do ?", "i live in a big city and i like it",
                                   "hi", "good night my dear friend , see you later"]]


@pytest.fixture(scope="module")
def fp32(tiny_dialogpt):
    return load_model(str(tiny_dialogpt))


@pytest.fixture(scope="module")
def int8(tiny_dialogpt):
    return load_model(str(tiny_dialogpt), quantize="int8")


# --------------------------------------------------------------------------- sampling

def _reference(logits, params, seen, banned, step, stop):
    """The per-row loop the engine used before (one row, greedy or the allowed set when sampling)."""
    row = logits.clone()
    if banned:
        row[sorted(banned)] = float("-inf")
    if step < params.min_new_tokens:
        row[sorted(stop)] = float("-inf")
    if params.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(seen))
        picked = row[idx]
        row[idx] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if not params.do_sample:
        return int(row.argmax())
    row = row / max(params.temperature, 1e-5)
    if 0 < params.top_k < row.numel():
        row[row < torch.topk(row, params.top_k).values[-1]] = float("-inf")
    if params.top_p < 1.0:
        ordered, order = torch.sort(row, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative > params.top_p
        drop[1:] = drop[:-1].clone()
        drop[0] = False
        row[order[drop]] = float("-inf")
    return {int(i) for i in torch.nonzero(torch.isfinite(row)).flatten()}


def test_vectorized_greedy_matches_the_per_row_loop_step_after_step():
    gen = torch.Generator().manual_seed(0)
    vocab, stop = 500, {0}
    rows = [(SamplingParams(do_sample=False, repetition_penalty=[1.0, 1.3, 2.0][i % 3], min_new_tokens=2),
             torch.randint(1, vocab, (5 + 7 * i,), generator=gen).tolist() if i != 3 else [],
             {3, 7} if i % 2 else set()) for i in range(6)]
    sampler = BatchSampler([RowSampler(p, c, b) for p, c, b in rows], stop)
    seen = [set(c) for _, c, _ in rows]
    for step in range(6):
        logits = torch.randn(len(rows), vocab, generator=gen) * 3
        before = logits.clone()
        expected = [_reference(logits[i], p, seen[i], b, step, stop) for i, (p, _, b) in enumerate(rows)]
        assert sampler.sample(logits, [step] * len(rows)) == expected
        assert torch.equal(logits, before)  # the caller's logits are left alone
        for i, token in enumerate(expected):
            seen[i].add(token)


def test_vectorized_sampling_stays_inside_each_rows_top_k_top_p():
    gen = torch.Generator().manual_seed(1)
    vocab = 400
    settings = [dict(top_k=5, top_p=1.0), dict(top_k=0, top_p=0.5), dict(top_k=40, top_p=0.9),
                dict(top_k=0, top_p=1.0, temperature=2.0), dict(top_k=3, top_p=0.3, seed=4)]
    logits = torch.randn(1, vocab, generator=gen) * 4
    for s in settings:
        params = SamplingParams(repetition_penalty=1.2, **s)
        context = list(range(10, 30))
        allowed = _reference(logits[0], params, set(context), {1}, 5, {0})
        sampler = BatchSampler([RowSampler(params, context, {1}) for _ in range(300)], {0})
        drawn = set(sampler.sample(logits.repeat(300, 1), [5] * 300))
        assert drawn <= allowed, s
        if len(allowed) > 1 and s.get("seed") is None:
            assert len(drawn) > 1


def test_mixed_batch_greedy_seeded_and_free_rows_join_and_leave():
    vocab = 300
    a = BatchSampler([RowSampler(SamplingParams(do_sample=False), [1, 2, 3], {5})], {0})
    a.sample(torch.randn(1, vocab), [0])
    b = BatchSampler([RowSampler(SamplingParams(seed=3), [], set()), RowSampler(SamplingParams(), [4] * 9, set())], {0})
    b.sample(torch.randn(2, vocab), [0, 0])
    a.merge(b)
    assert len(a) == 3 and a.seen.shape[0] == 3 and a.banned.shape[0] == 3
    logits = torch.randn(3, vocab)
    logits[:, 5] = 100.0  # banned for row 0 only
    tokens = a.sample(logits, [1, 1, 1])
    assert tokens[0] != 5
    a.select([2, 0])
    assert a.banned is not None and len(a) == 2
    a.select([0])
    assert a.banned is None  # the only row that banned anything left
    assert len(a.sample(torch.randn(1, vocab), [2])) == 1


def test_next_tokens_keeps_the_old_stateless_interface():
    rows = [RowSampler(SamplingParams(do_sample=False, repetition_penalty=100.0), [], set()) for _ in range(2)]
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    logits[:, 6] = 4.0
    assert next_tokens(logits, rows, [1, 1], {0}) == [4, 4]
    assert next_tokens(logits, rows, [2, 2], {0}) == [6, 6]  # 4 is now penalized through row.seen


# --------------------------------------------------------------------------- engine

async def test_identical_contexts_share_one_prefill_and_still_match_alone(fp32):
    """MMI sends N requests with one context: they are prefilled once and decoded as N rows."""
    from engine.serving.batcher import _Request

    async with Engine(fp32, SamplingParams(), max_batch_size=8) as engine:
        alone = [(await engine.reply(p, GREEDY)).text for p in PROMPTS[:2]]
        replies = await asyncio.gather(*[engine.reply(PROMPTS[i % 2], GREEDY) for i in range(6)])
        sampled = await asyncio.gather(*[engine.reply(PROMPTS[0], {"seed": s, "max_new_tokens": 6}) for s in range(4)])
    assert [r.text for r in replies] == [alone[i % 2] for i in range(6)]
    assert all(r.text for r in sampled)

    # white box: six requests with two distinct contexts make one prefill pass of two rows
    loop = asyncio.get_running_loop()
    params = SamplingParams(**GREEDY)
    contexts = [fp32.fmt.context_ids(PROMPTS[i % 2], 100) for i in range(6)]
    requests = [_Request(c, params, loop, loop.create_future(), 0.0) for c in contexts]
    batch_sizes = []
    hook = fp32.model.register_forward_pre_hook(lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                                with_kwargs=True)
    engine = Engine(fp32, fast_path="off")
    engine._make_decoder(fp32)  # as the worker does, outside inference mode
    try:
        with torch.inference_mode():
            batch = engine._prefill(fp32, requests)
    finally:
        hook.remove()
    assert batch_sizes == [2]
    assert len(batch.rows) == 6 and batch.state.mask.shape[0] == 6
    assert batch.next_input.tolist() == [batch.next_input[i % 2].item() for i in range(6)]
    # the fast path: one prefill of two contexts, fanned out to six cache rows
    engine = Engine(fp32)
    engine._make_decoder(fp32)
    with torch.inference_mode():
        step = engine._decoder.step
        original, seen = step.prefill, []
        step.prefill = lambda contexts, cache, *rest: seen.append(len(contexts)) or original(contexts, cache, *rest)
        fast = engine._prefill(fp32, [_Request(c, params, loop, loop.create_future(), 0.0) for c in contexts])
    assert engine._decoder.name == "fast" and seen == [2] and fast.state.rows == 6
    assert fast.next_input.tolist() == batch.next_input.tolist()


async def test_growing_kv_cache_gives_the_same_greedy_replies_as_concatenation(fp32):
    """The in-place KV cache (spare room + 4D mask) against transformers' own concatenating cache."""
    from engine.serving import kvcache

    results = {}
    for grow in (True, False):
        async with Engine(fp32, SamplingParams(), max_batch_size=4, grow_cache=grow, fast_path="off") as engine:
            async def late(i, prompt):
                await asyncio.sleep(0.01 * i)  # joins (and leaves) a batch that is already decoding
                n = 6 + 4 * i
                return (await engine.reply(prompt, dict(GREEDY, max_new_tokens=n, min_new_tokens=n))).text

            results[grow] = await asyncio.gather(*[late(i, p) for i, p in enumerate(PROMPTS * 2)])
    assert results[True] == results[False]
    out = fp32.model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert kvcache.can_grow(out.cache, fp32.model)  # so the first run really took the growing path


def test_growing_layer_keeps_keys_and_values_through_select_and_merge():
    from engine.serving import kvcache

    def cache_of(rows, length, start):
        from transformers import DynamicCache

        cache = DynamicCache()
        k = torch.arange(start, start + rows * 2 * length * 3, dtype=torch.float32).reshape(rows, 2, length, 3)
        cache.update(k, -k, 0)
        return cache

    a, b = cache_of(3, 5, 0), cache_of(2, 7, 1000)
    kvcache.use_growing(a)
    layer = a.layers[0]
    keys_before = layer.keys.clone()
    mask = kvcache.merge(a, torch.ones(3, 5, dtype=torch.long), b, torch.ones(2, 7, dtype=torch.long))
    assert mask.shape == (5, 7) and layer.keys.shape == (5, 2, 7, 3) and torch.equal(layer.values, -layer.keys)
    assert torch.equal(layer.keys[:3, :, 2:], keys_before)
    mask = kvcache.select(a, mask, [3, 4])  # only the 7-long rows: the 2 padding columns go
    assert mask.shape == (2, 7) and torch.equal(layer.keys, b.layers[0].keys) and torch.equal(layer.values, -layer.keys)
    kvcache.reserve(a, 1)
    new = torch.full((2, 2, 1, 3), 7.0)
    full_k, full_v = layer.update(new, -new)
    assert full_k.shape[2] == layer.capacity > layer.n == 8 and torch.equal(layer.keys[:, :, -1:], new)
    assert kvcache.mask_4d(a, torch.ones(2, 8)).shape == (2, 1, 1, layer.capacity)


async def test_engine_timing_counts_decode_and_prefill(fp32):
    async with Engine(fp32, SamplingParams(max_new_tokens=5, min_new_tokens=5)) as engine:
        await asyncio.gather(*[engine.reply(p) for p in PROMPTS])
    t = engine.timing
    assert t["decode_steps"] >= 4 and t["decode_rows"] >= 4 * len(PROMPTS) and t["prefill_s"] > 0 and t["decode_s"] > 0


# --------------------------------------------------------------------------- int8

def test_conv1d_to_linear_is_exact(tiny_dialogpt):
    from engine.serving.quantize import conv1d_to_linear

    model = load_model(str(tiny_dialogpt)).model
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        before = model(ids).logits
        assert conv1d_to_linear(model) == 4 * model.config.n_layer
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_packed_fp32_gives_the_same_logits_and_the_engine_packs_by_default(tiny_dialogpt):
    from engine.serving.quantize import PackedLinear, pack_fp32

    dense = load_model(str(tiny_dialogpt))
    ids = torch.randint(0, dense.model.config.vocab_size, (3, 15))
    with torch.inference_mode():
        before = dense.model(ids).logits
    n_params = dense.parameters
    assert pack_fp32(dense.model) == 4 * dense.model.config.n_layer  # the tied output head stays the embedding table
    with torch.inference_mode():
        after = dense.model(ids).logits
    assert torch.allclose(before, after, atol=1e-4) and dense.parameters >= n_params - dense.model.config.n_embd
    assert dense.model.lm_head.weight is dense.model.transformer.wte.weight  # no second copy of the head
    assert pack_fp32(dense.model) == 0  # nothing left to pack

    async def serve(loaded, **kwargs):
        async with Engine(loaded, SamplingParams(max_new_tokens=3), **kwargs) as engine:
            return await engine.reply(PROMPTS[0])

    fresh = load_model(str(tiny_dialogpt))  # transformers' forward packs; the fast path keeps the weights as they are
    assert asyncio.run(serve(fresh, fast_path="off")).text
    assert fresh.packed and any(isinstance(m, PackedLinear) for m in fresh.model.modules())
    other = load_model(str(tiny_dialogpt))
    assert asyncio.run(serve(other, pack_weights=False, fast_path="off")).text
    assert not any(isinstance(m, PackedLinear) for m in other.model.modules())


def test_int8_quantizes_every_layer_and_agrees_with_fp32(fp32, int8):
    from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from transformers.pytorch_utils import Conv1D

    from engine.serving.file_rows import FileRows
    from engine.serving.quantize import weight_bytes

    modules = list(int8.model.modules())
    assert not any(isinstance(m, (Conv1D, torch.nn.Linear)) for m in modules)
    # token and position tables: left in the memory-mapped checkpoint (fp32, rows read from the file), not copied
    assert not any(isinstance(m, QuantizedEmbedding) for m in modules) and sum(isinstance(m, FileRows) for m in modules) == 2
    from engine.serving.int8_native import NativeInt8Linear

    n_linear = sum(isinstance(m, (DynamicInt8Linear, NativeInt8Linear)) for m in int8.model.modules())
    assert n_linear == 4 * fp32.model.config.n_layer + 1  # every block's 4 layers + lm_head
    assert weight_bytes(int8.model) < 0.4 * weight_bytes(fp32.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fp32.model.config.vocab_size, (8, 40), generator=gen)
    with torch.inference_mode():
        a, b = fp32.model(ids).logits.argmax(-1), int8.model(ids).logits.argmax(-1)
    agreement = (a == b).float().mean().item()
    assert agreement > 0.8, agreement  # measured ~0.9 on this random tiny model; the bench reports real models


async def test_int8_model_answers_through_the_engine(int8):
    async with Engine(int8, SamplingParams(max_new_tokens=8)) as engine:
        replies = await asyncio.gather(*[engine.reply(p) for p in PROMPTS])
        greedy = await engine.reply(PROMPTS[0], GREEDY)
    assert all(r.text for r in replies) and greedy.new_tokens == 10


def test_config_int8_reaches_the_engine(tmp_path, tiny_dialogpt):
    from bots.app import load_configured_model
    from bots.config import Config

    config = Config()
    config.model.path = str(tiny_dialogpt)
    config.engine.quantize = "int8"
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from engine.serving.int8_native import NativeInt8Linear

    loaded = asyncio.run(load_configured_model(config))
    assert any(isinstance(m, (DynamicInt8Linear, NativeInt8Linear)) for m in loaded.model.modules())


# --------------------------------------------------------------------------- overload

async def test_overload_gets_the_busy_text_through_chat_service(tmp_path, fp32):
    from bots.chat.service import BUSY_TEXT, ChatService
    from bots.config import Config
    from bots.chat.events import Incoming
    from storage.store import Store
    from storage.db import Database

    db = await Database.open(tmp_path / "db.sqlite3")
    config = Config()
    engine = Engine(fp32, SamplingParams(max_new_tokens=40, min_new_tokens=40), max_batch_size=1, max_queue=1)
    chat = ChatService(config, engine, Store.over(db))
    try:
        async with engine:
            messages = [Incoming("console", f"chat{i}", f"user{i}", "hello there", message_id=str(i)) for i in range(8)]
            answers = await asyncio.gather(*[chat.handle(m) for m in messages])
    finally:
        await db.close()
    texts = [a[0].text for a in answers]
    assert BUSY_TEXT in texts  # overload is refused politely …
    assert any(t != BUSY_TEXT for t in texts)  # … while the requests that fit are answered


# --------------------------------------------------------------------------- mynah bench

@pytest.mark.timeout(600)  # a dozen processes (the bench's cases, `mynah run` twice): minutes on a busy 2-core box
def test_bench_quick_prints_every_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out_json = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "bench", "--quick", "--markdown", "--json", str(out_json)],
                            capture_output=True, text=True, timeout=560, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for row in ["GPT2-chitchat loop (no KV cache), 1 chat", "HF generate, 1 request at a time", "HF generate, batch of",
                "Mynah engine, 1 chat at once", "Mynah engine, 8 chats at once", "Mynah engine, 32 chats at once",
                "| int8 |", "| fp32 |", "floor ms/token", "next-token agreement", "prefix reuse",
                "context() fetch, p99", "log_message() throughput", "EXPLAIN QUERY PLAN",
                "USING INDEX messages_chat_id", "load average", "a lone chat while the model trains",
                "paused while the engine works (shipped default)", "chat p95 during a retrain",
                # issue 23: through the bot (a real `mynah run` behind the fake Bot API) and the Llama rows
                "through the bot", "lone reply, p50 (engine alone on the same message)",
                "8 chats at once, stream = true: first words p50 / p95", "peak RSS of `mynah run`",
                "a lone reply through the bot within 10 % of the engine's own time", "Llama family",
                "fp32 Llama: 8 chats ≥ 3× transformers' generate",
                "int8 Llama: 8 chats ≥ 3× transformers' generate"]:
        assert row in out, row
    assert out_json.exists()
    try:
        import ctranslate2  # noqa: F401  (optional: mynah[bench])
    except ImportError:
        assert "no CTranslate2 rows" in result.stderr
    else:
        for row in ["Mynah vs CTranslate2", "lone reply, p50", "8 chats at once until all answered vs one batch of 8",
                    "fp32 Llama: lone reply ≤ 1.0× CTranslate2", "int8 Llama: 8 chats vs a batch of 8 ≤ 1.0× CTranslate2",
                    "CTranslate2, window 0.1 s", "Mynah engine (continuous batching)"]:
            assert row in out, row


def test_bench_names_the_cpus_instruction_sets_and_reads_them_from_cpuinfo():
    from engine import cpu
    from scripts.bench.machine import machine, simd_features

    intel = {"fpu", "avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}
    assert simd_features(intel) == ["AVX2", "AVX-512F", "AVX512-VNNI", "AMX-TILE", "AMX-INT8"]
    assert simd_features({"fpu", "sse2", "avx"}) == []  # no kernel-relevant set: nothing claimed
    assert machine()["cpu_features"] == simd_features(cpu.flags())  # cpu.flags() against the file: tests/test_cpu.py


def test_bench_from_outside_the_checkout_still_finds_the_fake_bot_api(tmp_path):
    """The `mynah` console script does not put the checkout on sys.path; the bot rows must not vanish."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import sys; from scripts.bench import bot; print(repr(bot.available()))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    if "No module named 'scripts'" in result.stderr:
        pytest.skip("Mynah is not installed in this environment (`pip install -e .`)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "''", result.stdout
