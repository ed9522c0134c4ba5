"""Engine: loading, dialogue formats, sampling, continuous batching on tiny real models."""
from __future__ import annotations

import asyncio

import pytest

import dataclasses
from types import SimpleNamespace

from engine.serving.batcher import Engine, EngineBusy
from engine.dialogue import DialogueFormat
from engine.model import ModelLoadError, load_model
from engine.serving.protocol import EngineStats, EngineStopped, EngineUnavailable, ModelEngine, ReplyEngine
from engine.serving.sampling import SamplingParams
from engine.types import max_positions, percentile

GREEDY = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0)
PROMPTS = [[("user", t)] for t in ["hello there", "what do you like to do ?", "i live in a big city and i like it",
                                   "hi", "good night my dear friend , see you later"]]


@pytest.fixture(scope="module")
def dialogpt(tiny_dialogpt):
    return load_model(str(tiny_dialogpt))


@pytest.fixture(scope="module")
def chitchat(tiny_chitchat):
    return load_model(str(tiny_chitchat))


def test_dialogpt_format_joins_turns_with_eos(dialogpt):
    fmt = dialogpt.fmt
    assert fmt.name == "dialogpt"
    eos = dialogpt.tokenizer.eos_token_id
    ids = fmt.context_ids([("user", "hello there"), ("bot", "hi"), ("user", "how are you ?")], 200)
    assert ids.count(eos) == 3 and ids[-1] == eos
    assert dialogpt.tokenizer.decode(ids).split("<|endoftext|>")[:3] == ["hello there", "hi", "how are you ?"]


def test_context_keeps_newest_turns_within_budget(dialogpt):
    fmt = dialogpt.fmt
    turns = [("user", f"turn number {i} is here") for i in range(20)]
    ids = fmt.context_ids(turns, 30)
    assert len(ids) <= 30
    text = dialogpt.tokenizer.decode(ids)
    assert "turn number 19" in text and "turn number 0 " not in text


def test_gpt2_chitchat_checkpoint_loads_unchanged(tiny_chitchat, chitchat):
    assert sorted(p.name for p in tiny_chitchat.iterdir()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    vocab_lines = (tiny_chitchat / "vocab.txt").read_text(encoding="utf-8").split()
    assert len(chitchat.tokenizer.get_vocab()) == len(vocab_lines)  # the real vocab, not 5 specials
    assert chitchat.fmt.name == "chitchat"
    ids = chitchat.fmt.context_ids([("user", "你好吗"), ("bot", "我很好")], 100)
    tok = chitchat.tokenizer
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "你", "好", "吗", "[SEP]", "我", "很", "好", "[SEP]"]
    assert tok.unk_token_id not in ids


async def test_chinese_chat_never_emits_unk(chitchat):
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=20, min_new_tokens=20, seed=1)
    async with Engine(chitchat, params) as engine:
        replies = await asyncio.gather(*[engine.reply([("user", "你好")], {"seed": s}) for s in range(4)])
    for reply in replies:
        assert reply.text and "[UNK]" not in reply.text and "[CLS]" not in reply.text
        assert " " not in reply.text.strip() or any(c.isascii() for c in reply.text)  # CJK is joined up


def test_format_override_and_unknown_format(dialogpt):
    assert DialogueFormat(dialogpt.tokenizer, "dialogpt").name == "dialogpt"
    with pytest.raises(ValueError, match="unknown dialogue format"):
        DialogueFormat(dialogpt.tokenizer, "nonsense")


def test_chat_template_format(dialogpt):
    tok = dialogpt.tokenizer
    tok_copy = type(tok).from_pretrained(dialogpt.path)
    tok_copy.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    fmt = DialogueFormat(tok_copy)
    assert fmt.name == "chat_template"
    text = tok_copy.decode(fmt.context_ids([("user", "hi"), ("bot", "hello")], 200))
    assert text.startswith("<user>hi") and "<assistant>hello" in text and text.endswith("<assistant>")


async def test_batched_greedy_equals_alone_including_late_joiners(dialogpt):
    async with Engine(dialogpt, SamplingParams(), max_batch_size=8) as engine:
        alone = [(await engine.reply(p, GREEDY)).text for p in PROMPTS]
        together = [r.text for r in await asyncio.gather(*[engine.reply(p, GREEDY) for p in PROMPTS])]

        async def late(i, prompt):
            await asyncio.sleep(0.01 * i)  # joins a batch that is already decoding
            return (await engine.reply(prompt, dict(GREEDY, max_new_tokens=8 + 3 * i, min_new_tokens=8 + 3 * i))).text

        staggered = await asyncio.gather(*[late(i, p) for i, p in enumerate(PROMPTS)])
        alone_var = [(await engine.reply(p, dict(GREEDY, max_new_tokens=8 + 3 * i, min_new_tokens=8 + 3 * i))).text
                     for i, p in enumerate(PROMPTS)]
    assert len(set(alone)) > 1  # the prompts really lead to different outputs
    assert together == alone
    assert staggered == alone_var


async def test_sixteen_concurrent_replies_all_answered(dialogpt):
    async with Engine(dialogpt, SamplingParams(max_new_tokens=10), max_batch_size=8) as engine:
        replies = await asyncio.gather(*[engine.reply([("user", f"hello number {i}")]) for i in range(16)])
    assert len(replies) == 16
    assert all(r.text.strip() and r.model_version == dialogpt.version for r in replies)


async def test_engine_keeps_the_reply_engine_contract_and_reports_typed_stats(dialogpt):
    engine = Engine(dialogpt, SamplingParams(max_new_tokens=6))
    assert isinstance(engine, ReplyEngine) and isinstance(engine, ModelEngine)
    before = engine.stats()
    assert isinstance(before, EngineStats) and before.mmi is None
    assert (before.replies, before.queue_depth, before.active, before.latency_p50_s) == (0, 0, 0, None)
    with pytest.raises(EngineStopped):
        await engine.reply(PROMPTS[0])
    async with engine:
        await asyncio.gather(*[engine.reply(p) for p in PROMPTS[:3]])
    after = engine.stats()
    assert after.replies == 3 and after.model_version == dialogpt.version and after.active == 0
    assert 0 < after.latency_p50_s <= after.latency_p95_s and after.uptime_s > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.replies = 0


def test_one_position_limit_and_one_percentile(dialogpt):
    assert max_positions(dialogpt.model) == max_positions(dialogpt.model.config) == 256
    assert max_positions(SimpleNamespace(max_position_embeddings=2048)) == 2048  # llama-style configs
    assert max_positions(SimpleNamespace()) == 1024
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.5) == 1.5  # linear between neighbours
    assert percentile(range(101), 0.95) == 95
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_config_generation_defaults_are_the_engines():
    from bots.config import GenerationConfig

    config, engine = GenerationConfig(), SamplingParams()
    shared = [f.name for f in dataclasses.fields(SamplingParams) if hasattr(config, f.name)]
    assert len(shared) >= 8
    assert {n: getattr(config, n) for n in shared} == {n: getattr(engine, n) for n in shared}


async def test_seed_makes_sampling_reproducible(dialogpt):
    async with Engine(dialogpt, SamplingParams(temperature=1.0, max_new_tokens=10, min_new_tokens=10)) as engine:
        a = await engine.reply(PROMPTS[0], {"seed": 7})
        b = await engine.reply(PROMPTS[0], {"seed": 7})
        others = {(await engine.reply(PROMPTS[0], {"seed": s})).text for s in range(8, 12)}
    assert a.text == b.text
    assert len(others | {a.text}) > 1


async def test_empty_generation_gets_fallback(dialogpt):
    eos = dialogpt.tokenizer.eos_token_id

    def always_end(module, inputs, output):  # the model now says nothing, whatever it samples
        output.logits[..., eos] = 1e4
        return output

    hook = dialogpt.model.register_forward_hook(always_end)
    try:
        async with Engine(dialogpt, SamplingParams(min_new_tokens=0), fallback_reply="no words", fast_path="off") as engine:
            reply = await engine.reply(PROMPTS[0])
    finally:
        hook.remove()
    assert reply.fallback and reply.text == "no words"


async def test_min_new_tokens_and_max_new_tokens(dialogpt):
    async with Engine(dialogpt, SamplingParams()) as engine:
        reply = await engine.reply(PROMPTS[0], dict(GREEDY, max_new_tokens=5, min_new_tokens=5))
    assert reply.new_tokens == 5


async def test_unknown_override_is_refused(dialogpt):
    async with Engine(dialogpt, SamplingParams()) as engine:
        with pytest.raises(ValueError, match="unknown generation setting"):
            await engine.reply(PROMPTS[0], {"temprature": 0.5})


async def test_overload_is_refused_not_queued_forever(dialogpt):
    engine = Engine(dialogpt, SamplingParams(max_new_tokens=30, min_new_tokens=30), max_batch_size=1, max_queue=2)
    async with engine:
        results = await asyncio.gather(*[engine.reply(PROMPTS[0]) for _ in range(8)], return_exceptions=True)
    busy = [r for r in results if isinstance(r, EngineBusy)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert busy and answered and len(busy) + len(answered) == 8


async def test_hot_swap_between_batches(tiny_dialogpt, dialogpt):
    other = load_model(str(tiny_dialogpt), version="v0002")
    async with Engine(dialogpt, SamplingParams(max_new_tokens=6)) as engine:
        first = await engine.reply(PROMPTS[0])
        engine.swap(other)
        second = await engine.reply(PROMPTS[0])
    assert first.model_version == dialogpt.version and second.model_version == "v0002"


async def test_a_worker_that_dies_fails_every_waiting_chat_at_once(tiny_dialogpt, monkeypatch):
    """A model the worker cannot serve (here its decoder fails to build) once killed the worker thread
    and left every chat waiting for ever; now each waiting and later request fails with why."""
    loaded = load_model(str(tiny_dialogpt))

    def broken(self, loaded):
        raise AttributeError("'LeanGPT2' object has no attribute 'get_input_embeddings'")

    monkeypatch.setattr(Engine, "_make_decoder", broken)
    async with Engine(loaded, SamplingParams(max_new_tokens=4)) as engine:
        results = await asyncio.wait_for(asyncio.gather(*[engine.reply(PROMPTS[0]) for _ in range(3)],
                                                        return_exceptions=True), 60)
        assert all(isinstance(r, EngineUnavailable) and "get_input_embeddings" in str(r) for r in results), results
        with pytest.raises(EngineUnavailable, match="the engine stopped"):
            await engine.reply(PROMPTS[0])


async def test_a_model_that_cannot_be_served_is_not_swapped_in(tiny_dialogpt, dialogpt, monkeypatch):
    """A promoted model whose decoder fails to build: the swap reports the error and the engine goes
    on serving the model it had."""
    other = load_model(str(tiny_dialogpt), version="v0009")
    make = Engine._make_decoder

    def picky(self, loaded):
        if loaded.version == "v0009":
            raise RuntimeError("cannot serve this one")
        make(self, loaded)

    monkeypatch.setattr(Engine, "_make_decoder", picky)
    async with Engine(dialogpt, SamplingParams(max_new_tokens=4)) as engine:
        await engine.reply(PROMPTS[0])
        with pytest.raises(RuntimeError, match="cannot serve this one"):
            await asyncio.wait_for(asyncio.wrap_future(engine.swap(other)), 60)
        reply = await engine.reply(PROMPTS[0])
    assert reply.model_version == dialogpt.version


def test_missing_and_corrupt_models_give_clear_errors(tmp_path, tiny_dialogpt):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dialogpt.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(str(broken))


@pytest.mark.parametrize("hub", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_name_offline_fails_at_once_with_one_message(tmp_path, hub):
    """`mynah generate --model org/name` with the hub out of reach (HF_HUB_OFFLINE set, or a
    hub address that refuses connections) and an empty cache: one line, in seconds — not 49 s
    of retried downloads. Nothing leaves 127.0.0.1."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                 "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    if hub == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{tmp_path / "db.sqlite3"}"\n')
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "scripts.cli", "--config", str(config), "generate", "--model",
                           "someorg/not-downloaded", "--prompt", "hi"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    took = time.monotonic() - started
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert done.returncode == 1 and took < 15, (took, done.stderr)
    assert len(lines) == 1 and "someorg/not-downloaded" in lines[0] and "Retrying" not in done.stderr, done.stderr
    assert ("HF_HUB_OFFLINE is set" if hub == "HF_HUB_OFFLINE" else "unreachable") in lines[0]


async def test_a_held_burst_is_prefilled_as_one_batch_and_an_unused_ticket_releases(dialogpt, monkeypatch):
    """engine/serving/admission.py: while a platform's fetched updates are held, the idle worker
    waits for each one's request (or its end) and prefills them together."""
    groups: list[int] = []
    real = Engine._prefill

    def spy(self, loaded, admitted, running=None):
        groups.append(len(admitted))
        return real(self, loaded, admitted, running)

    monkeypatch.setattr(Engine, "_prefill", spy)
    async with Engine(dialogpt, SamplingParams(max_new_tokens=3, min_new_tokens=3)) as engine:
        gate = engine.admission

        async def update(text: str | None, delay: float):
            with gate.ticket():
                await asyncio.sleep(delay)   # storing the message before the reply is asked for
                if text is not None:
                    return (await engine.reply([("user", text)])).text

        gate.hold(3)
        answers = await asyncio.gather(update("hello", 0.0), update("how are you", 0.1), update(None, 0.15))
        assert groups == [2] and all(answers[:2])   # without the hold: [1, 1]
        groups.clear()
        gate.hold(2)                                # one update never asks (a command): its end releases it
        await asyncio.gather(update(None, 0.0), update("again", 0.05))
        assert groups == [1] and gate.waiting_s() == 0.0
