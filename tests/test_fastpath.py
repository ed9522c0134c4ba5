"""The hand-written GPT-2 decode path (engine.serving.fastpath) against transformers' own.

fp32: the same greedy tokens as HF `generate`, exactly, also for requests that join and
leave a running batch. int8: the fast path runs the same int8 kernels on the same weights,
but dynamic int8 quantizes each layer's input with one scale per call, and the calls differ
(right- vs left-padded prefill), so tokens may differ: it must agree with transformers' int8
forward on ≥ 90 % of next tokens (teacher-forced) — the int8-vs-fp32 agreement documented
in docs/BENCHMARKS.md is 96.7 % on the starter model. No timings here.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from engine.model import load_model
from engine.serving.batcher import Engine
from engine.serving.fastpath import FastDecoder, pick_decoder
from engine.serving.fastpath.cache import StaticKV
from engine.serving.sampling import SamplingParams
from engine.serving.worker import auto_threads

PROMPTS = [[("user", t)] for t in ["hello there", "what do you like to do ?", "i live in a big city and i like it",
                                   "hi", "good night my dear friend , see you later", "do you have a dog ?"]]


def greedy(n: int) -> dict:
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0,
                finish_sentences=False)  # the tokens exactly as drawn, to compare with generate()


@pytest.fixture(scope="module")
def fp32(tiny_dialogpt):
    return load_model(str(tiny_dialogpt))


@pytest.fixture(scope="module")
def int8(tiny_dialogpt):
    return load_model(str(tiny_dialogpt), quantize="int8")


def hf_generate(loaded, turns, n: int) -> str:
    ids = loaded.fmt.context_ids(turns, 200)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=loaded.fmt.pad_id)
    return loaded.fmt.decode(out[0, len(ids):].tolist())


async def test_fp32_fast_path_gives_hf_generates_greedy_tokens_with_rows_joining_and_leaving(fp32):
    lengths = [6 + 5 * i for i in range(len(PROMPTS))]
    expected = [hf_generate(fp32, p, n) for p, n in zip(PROMPTS, lengths)]
    async with Engine(fp32, SamplingParams(), max_batch_size=4) as engine:
        async def late(i):
            await asyncio.sleep(0.02 * i)  # joins a batch that is already decoding; shorter ones leave first
            return (await engine.reply(PROMPTS[i], greedy(lengths[i]))).text

        got = await asyncio.gather(*[late(i) for i in range(len(PROMPTS))])
        alone = [(await engine.reply(p, greedy(n))).text for p, n in zip(PROMPTS, lengths)]
        assert engine._decoder.name == "fast"
    assert got == expected and alone == expected


async def test_fp32_fast_path_equals_transformers_path_under_sampling_with_seeds(fp32):
    params = dict(max_new_tokens=12, min_new_tokens=12)
    texts = {}
    for mode in ("auto", "off"):
        async with Engine(fp32, SamplingParams(), max_batch_size=8, fast_path=mode) as engine:
            texts[mode] = await asyncio.gather(*[engine.reply(p, dict(params, seed=i)) for i, p in enumerate(PROMPTS)])
    assert [r.text for r in texts["auto"]] == [r.text for r in texts["off"]]


def _teacher_forced_argmax(loaded, decode_fast: bool, ids: list[int]) -> list[int]:
    """Next-token argmax after each prefix of `ids` (prefill of 4 tokens, then decode steps)."""
    decoder = pick_decoder(loaded.model, "auto" if decode_fast else "off", pad_id=loaded.fmt.pad_id)
    with torch.inference_mode():
        state, logits = decoder.prefill([ids[:4]], [0])
        out = [int(logits.argmax())]
        for token in ids[4:]:
            logits = decoder.decode(state, torch.tensor([token]))
            out.append(int(logits.argmax()))
    return out


def test_int8_fast_path_agrees_with_transformers_int8(int8):
    assert isinstance(pick_decoder(int8.model, "auto"), FastDecoder)
    agree = total = 0
    for turns in PROMPTS:
        ids = int8.fmt.context_ids(turns + [("bot", "i like to read books"), ("user", "that is nice")], 200)
        fast = _teacher_forced_argmax(int8, True, ids)
        slow = _teacher_forced_argmax(int8, False, ids)
        agree += sum(a == b for a, b in zip(fast, slow))
        total += len(fast)
    assert total > 50 and agree / total >= 0.9


async def test_int8_engine_on_the_fast_path_answers_batched_and_alone(int8):
    async with Engine(int8, SamplingParams(), max_batch_size=4) as engine:
        replies = await asyncio.gather(*[engine.reply(p, greedy(8)) for p in PROMPTS])
        assert engine._decoder.name == "fast"
    assert all(r.new_tokens == 8 and r.text for r in replies)


def test_fast_path_switch_and_models_it_does_not_serve(fp32):
    assert pick_decoder(fp32.model, "auto").name == "fast"
    assert pick_decoder(fp32.model, "off").name == "transformers"
    with pytest.raises(ValueError, match="fast_path"):
        pick_decoder(fp32.model, "fastest")
    with pytest.raises(ValueError, match="fast_path"):
        Engine(fp32, fast_path="on")

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, hidden_act="gelu"))
    assert pick_decoder(llama, "auto").name == "transformers"  # a Llama whose MLP is not SwiGLU


def test_static_cache_keeps_each_rows_keys_through_merge_select_and_growth():
    def filled(lengths, base):
        cache = StaticKV(layers=2, heads=1, head_dim=2)
        cache.add_rows(lengths)
        for row, n in enumerate(lengths):  # every cached value names its row and column
            for col in range(n):
                cache.buffer[:, :, row, 0, col] = base + 100 * row + col
        return cache

    def row_values(cache, row):
        n = cache.lengths[row]
        return cache.buffer[1, 0, row, 0, :n, 0].tolist()

    a, b = filled([3, 5], 0), filled([7], 1000)
    expect = [row_values(a, 0), row_values(a, 1), row_values(b, 0)]
    a.merge(b)
    assert a.lengths == [3, 5, 7] and [row_values(a, i) for i in range(3)] == expect
    a.select([0, 2])  # row 1 leaves; row 2 moves up
    assert a.lengths == [3, 7] and [row_values(a, i) for i in range(2)] == [expect[0], expect[2]]
    a.select([1, 1, 0])  # a shared prefill fanned out
    assert [row_values(a, i) for i in range(3)] == [expect[2], expect[2], expect[0]]
    rows, columns = a.capacity()
    for _ in range(columns):  # decode past the column capacity: the buffer grows, the values stay
        write, mask, width = a.advance()
    assert a.capacity()[1] > columns and a.lengths == [7 + columns, 7 + columns, 3 + columns]
    assert a.buffer[1, 0, 0, 0, :7, 0].tolist() == expect[2] and a.buffer[1, 0, 2, 0, :3, 0].tolist() == expect[0]
    assert mask is not None and mask.shape == (3, 1, 1, width) and torch.isinf(mask[2, 0, 0, -4:]).all()


async def test_ctranslate2_backend_answers_and_follows_a_swap(tmp_path, tiny_dialogpt, monkeypatch):
    pytest.importorskip("ctranslate2")
    import shutil

    from bots.config import ConfigError, load_config
    from engine.serving.ct2_backend import CT2Engine
    from engine.serving.protocol import ReplyEngine

    folder = tmp_path / "model"
    shutil.copytree(tiny_dialogpt, folder)
    monkeypatch.setenv("MYNAH_CT2_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(folder), version="v1")
    async with CT2Engine(loaded, SamplingParams(), precision="fp32") as engine:
        assert isinstance(engine, ReplyEngine)
        replies = await asyncio.gather(*[engine.reply(p, greedy(6)) for p in PROMPTS[:3]])
        assert list((tmp_path / "cache").glob("*/ct2-float32/model.bin"))
        expected = [hf_generate(loaded, p, 6) for p in PROMPTS[:3]]
        assert [r.text for r in replies] == expected and all(r.model_version == "v1" for r in replies)
        engine.swap(load_model(str(folder), version="v2"))
        assert (await engine.reply(PROMPTS[0])).model_version == "v2"
    assert engine.stats().replies == 4
    (tmp_path / "bad.toml").write_text('[engine]\nbackend = "onnx"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="backend"):
        load_config(tmp_path / "bad.toml")


async def test_engine_changes_its_threads_in_the_worker_and_the_trainer_hook_restores_them(fp32):
    import os

    from bots.config import EngineConfig
    from bots.learning.quiet import engine_yields_cores

    async with Engine(fp32, SamplingParams(max_new_tokens=3)) as engine:
        engine.set_threads(1)
        await engine.reply(PROMPTS[0])
        assert engine.threads_now == 1
        engine.set_threads(0)  # back to the engine's own setting (0 = one per core but one, for the event loop)
        await engine.reply(PROMPTS[0])
        assert engine.threads_now == auto_threads() == max(1, len(os.sched_getaffinity(0)) - 1)

    class Recorder:
        def __init__(self):
            self.calls = []

        def set_threads(self, n):
            self.calls.append(n)

    engine = Recorder()
    with pytest.raises(RuntimeError):
        with engine_yields_cores(engine, EngineConfig(threads=2, threads_while_training=1)):
            assert engine.calls == [1]
            raise RuntimeError("the trainer failed")
    assert engine.calls == [1, 2]  # restored however the run ends
    with engine_yields_cores(engine, EngineConfig(threads_while_training=0)):
        pass
    assert engine.calls == [1, 2]  # 0 = leave the engine alone


async def test_trainer_child_is_paused_while_the_engine_answers(fp32):
    import os
    import subprocess
    import sys
    import time

    from bots.config import EngineConfig, LearningConfig
    from bots.learning.quiet import engine_yields_cores

    def state(pid, want_stopped=None):
        """The child's state letter; waits (≤ 1 s) for the signal to land when told what to expect."""
        deadline = time.monotonic() + 1.0
        while True:
            with open(f"/proc/{pid}/stat") as f:
                letter = f.read().rsplit(")", 1)[1].split()[0]
            if want_stopped is None or (letter == "T") == want_stopped or time.monotonic() > deadline:
                return letter
            time.sleep(0.005)

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc")
    seen = []
    async with Engine(fp32, SamplingParams(max_new_tokens=4)) as engine:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"], start_new_session=True)
        try:
            with engine_yields_cores(engine, EngineConfig(), LearningConfig()) as quiet:
                quiet.started(child.pid)
                hook = engine._busy_hook
                engine.set_busy_hook(lambda busy: (hook(busy), seen.append((busy, state(child.pid, busy)))))
                await engine.reply(PROMPTS[0])
                await asyncio.sleep(0.05)  # the worker reports idle after the reply is out
                await engine.reply(PROMPTS[1])
                await asyncio.sleep(0.05)
                os.killpg(child.pid, __import__("signal").SIGSTOP)  # stopped when the run ends …
            assert state(child.pid, False) != "T"  # … is continued: the loop never leaves a stopped trainer
        finally:
            child.kill()
            child.wait()
    assert seen == [(True, "T"), (False, seen[1][1]), (True, "T"), (False, seen[3][1])]
    assert seen[1][1] != "T" and seen[3][1] != "T"
    assert engine._busy_hook is None  # removed when the run ended


@pytest.mark.parametrize("fast_path", ["auto", "off"])
async def test_the_engine_runs_int8_layers_without_asking_packed_weights_for_torch_function(tiny_dialogpt, fast_path,
                                                                                             monkeypatch):
    """With `__torch_function__` dispatch on, every int8 call made torch look the attribute up on
    fbgemm's packed weights (a TorchScript object), a lookup that throws a C++ exception inside
    libtorch (~12 us a call); the engine's worker runs the fast path and transformers' forward
    with that dispatch off (fbgemm's layers: where Mynah's int8 kernel does not run)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from engine.serving import int8_native
    from engine.serving.fastpath import linear

    monkeypatch.setattr(int8_native, "int8_why_not", lambda: "not here")
    int8 = load_model(str(tiny_dialogpt), quantize="int8")

    seen = []
    call, forward = linear.Linear.__call__, DynamicInt8Linear.forward

    def recording_call(self, x):
        if self.kind == "int8":
            seen.append(torch._C._is_torch_function_enabled())
        return call(self, x)

    def recording_forward(self, x):
        seen.append(torch._C._is_torch_function_enabled())
        return forward(self, x)

    monkeypatch.setattr(linear.Linear, "__call__", recording_call)
    monkeypatch.setattr(DynamicInt8Linear, "forward", recording_forward)
    async with Engine(int8, SamplingParams(), max_batch_size=4, fast_path=fast_path) as engine:
        await asyncio.gather(*[engine.reply(p, greedy(4)) for p in PROMPTS[:2]])
        assert engine._decoder.name == ("fast" if fast_path == "auto" else "transformers")
    assert seen and not any(seen)
    assert torch._C._is_torch_function_enabled()  # only in the worker


async def test_the_engines_worker_runs_the_compiled_layers_without_torchscripts_optimizing_executor(int8, monkeypatch):
    """The optimizing executor profiles the first calls and keeps shape-specialised graphs (~12 MB of the
    bot's RSS, no speed on the CPU); the worker turns it off for itself only."""
    seen = []
    decode = FastDecoder.decode

    def recording_decode(self, state, tokens):
        seen.append(torch._C._get_graph_executor_optimize())
        return decode(self, state, tokens)

    monkeypatch.setattr(FastDecoder, "decode", recording_decode)
    async with Engine(int8, SamplingParams(), max_batch_size=4) as engine:
        await engine.reply(PROMPTS[0], greedy(4))
        assert isinstance(engine._decoder.step.layers, torch.jit.ScriptModule)
    assert seen and not any(seen)
    assert torch._C._get_graph_executor_optimize()  # only in the worker
