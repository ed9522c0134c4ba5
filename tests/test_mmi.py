"""MMI reranking, the backward model's reversed data, `mynah generate` and `mynah eval`, on tiny models."""
from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.serving.batcher import Engine
from engine.training.evaluation import distinct_n, is_echo, is_stock, reply_metrics
from engine.serving.mmi import (MMIEngine, backward_scores, backward_sequences, combined_scores, forward_scores,
                        forward_sequences, pick_best)
from engine.model import LoadedModel, load_model
from engine.serving.protocol import ModelEngine, ReplyEngine
from engine.serving.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SAMPLING = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=6, min_new_tokens=2)
DIALOGUES = [
    ["hello there", "hi , how are you ?", "i am fine thanks"],
    ["what do you like to do ?", "i like to read books", "that is nice", "thank you very much"],
    ["do you have a dog ?", "yes i have a small dog"],
    ["where do you live ?", "i live in a big city", "good night", "see you later", "good morning"],
]


@pytest.fixture(scope="module")
def forward(tiny_dialogpt):
    return load_model(str(tiny_dialogpt))


@pytest.fixture(scope="module")
def backward(tmp_path_factory):
    from tests.conftest import build_dialogpt_model

    return load_model(str(build_dialogpt_model(tmp_path_factory.mktemp("mmi") / "backward", seed=1)))


# --------------------------------------------------------------------------- the reversed corpus

def test_prepare_reverse_puts_turns_newest_first(forward):
    from engine.training.data import prepare, reverse_turns

    assert reverse_turns([["a", "b", "c"]]) == [["c", "b", "a"]]
    data = prepare(forward.fmt, DIALOGUES, max_len=200, valid_fraction=0.0, reverse=True)
    eos = forward.tokenizer.eos_token
    decoded = sorted(forward.tokenizer.decode(w).split(eos)[:-1] for w in data.train)
    assert decoded == sorted(list(reversed(d)) for d in DIALOGUES)
    forward_data = prepare(forward.fmt, DIALOGUES, max_len=200, valid_fraction=0.0)
    assert sorted(forward.tokenizer.decode(w).split(eos)[:-1] for w in forward_data.train) == sorted(DIALOGUES)


def test_train_reverse_trains_on_reversed_dialogues(tmp_path, monkeypatch, forward):
    """`mynah train --reverse` goes through prepare(reverse=True): the windows it trains on are reversed."""
    import engine.training.train as train_module
    from scripts.cli import build_parser
    from scripts.train import config_from_args

    corpus = tmp_path / "dialogues.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES * 3), encoding="utf-8")
    seen = {}
    real_prepare = train_module.prepare

    def spy(*args, **kwargs):
        bound = inspect.signature(real_prepare).bind(*args, **kwargs)
        bound.apply_defaults()
        data = real_prepare(*args, **kwargs)
        seen.update(fmt=bound.arguments["fmt"], reverse=bound.arguments["reverse"], data=data)
        return data

    monkeypatch.setattr(train_module, "prepare", spy)
    args = build_parser().parse_args([
        "train", "--corpus", str(corpus), "--reverse", "--output", str(tmp_path / "mmi"), "--n-layer", "1",
        "--n-embd", "16", "--n-head", "2", "--vocab-size", "300", "--max-steps", "2", "--batch-size", "4",
        "--valid-fraction", "0.25", "--no-progress"])
    metrics = train_module.train(config_from_args(args))
    assert seen["reverse"] is True and metrics["data"]["reverse"] is True
    tok, eos = seen["fmt"].tokenizer, seen["fmt"].tokenizer.eos_token
    windows = [tok.decode(w).split(eos)[:-1] for w in seen["data"].train + seen["data"].valid]
    assert windows and all(w in [list(reversed(d)) for d in DIALOGUES] for w in windows)
    assert load_model(str(tmp_path / "mmi")).fmt.name == "dialogpt"


# --------------------------------------------------------------------------- choosing, by hand

def test_pick_best_by_hand():
    candidates = ["i don't know", "i like to read books", "lol"]
    fwd = [-1.0, -2.0, -1.5]   # the forward model prefers the generic reply
    bwd = [-5.0, -1.0, -6.0]   # the backward model: only the books reply explains the context
    # w=0.5: -3.0, -1.5, -3.75 → books
    assert combined_scores(fwd, bwd, 0.5) == [-3.0, -1.5, -3.75]
    assert pick_best(candidates, fwd, bwd, 0.5) == 1
    assert pick_best(candidates, fwd, bwd, 0.0) == 0      # forward only
    assert pick_best(candidates, fwd, bwd, 1.0) == 1      # pure MMI (GPT2-chitchat)
    # w=0.1: -1.4, -1.9, -1.95 → the forward favourite still wins
    assert pick_best(candidates, fwd, bwd, 0.1) == 0
    assert pick_best(["a", "b"], [-1.0, -1.0], [-2.0, -2.0], 0.5) == 0   # a tie goes to the first
    assert pick_best(["", "b"], [0.0, -9.0], [0.0, -9.0], 0.5) == 1       # empty never wins…
    assert pick_best(["", " "], [-3.0, -1.0], [0.0, 0.0], 0.5) == 1       # …unless all are empty
    with pytest.raises(ValueError):
        pick_best(["a"], [1.0, 2.0], [1.0, 2.0], 0.5)
    with pytest.raises(ValueError):
        pick_best(["a"], [1.0], [1.0], 1.5)


# --------------------------------------------------------------------------- scores are what they claim

def _manual_logprobs(loaded, ids, start) -> torch.Tensor:
    """Log-prob of each token ids[start:], one sequence, no batching or padding."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), -1)
    return torch.stack([logprobs[t - 1, ids[t]] for t in range(start, len(ids))])


def test_forward_score_is_mean_logprob_of_the_reply(forward):
    turns = [("user", "hello there"), ("bot", "hi , how are you ?"), ("user", "i am fine thanks")]
    candidates = ["what do you like to do ?", "ok", "i live in a big city"]
    scores = forward_scores(forward, turns, candidates)
    fmt = forward.fmt
    context = fmt.context_ids(turns, 200)
    for cand, score in zip(candidates, scores):
        ids = context + fmt.encode_text(cand) + [fmt.turn_end_id]
        assert score == pytest.approx(float(_manual_logprobs(forward, ids, len(context)).mean()), abs=1e-4)
    sequences, starts = forward_sequences(forward, turns, candidates)
    assert all(s[:start] == context for s, start in zip(sequences, starts))


def test_backward_score_is_log_prob_of_the_context_given_the_reply(backward):
    turns = [("user", "hello there"), ("bot", "hi , how are you ?"), ("user", "i am fine thanks")]
    candidates = ["that is nice", "lol"]
    scores = backward_scores(backward, turns, candidates)
    fmt = backward.fmt
    tail = fmt.dialogue_ids(["i am fine thanks", "hi , how are you ?", "hello there"])
    for cand, score in zip(candidates, scores):
        head = fmt.dialogue_ids([cand])
        assert score == pytest.approx(float(_manual_logprobs(backward, head + tail, len(head)).sum()), abs=1e-3)
        # the same number as the HF loss with the reply's tokens masked out, times the context's length
        ids = torch.tensor([head + tail])
        labels = ids.clone()
        labels[0, :len(head)] = -100
        with torch.no_grad():
            loss = backward.model(input_ids=ids, labels=labels).loss
        assert score == pytest.approx(-float(loss) * (len(tail)), abs=1e-3)
    sequences, starts = backward_sequences(backward, turns, candidates)
    assert [s[start:] for s, start in zip(sequences, starts)] == [tail, tail]   # same context for every candidate
    assert backward_scores(backward, [], candidates) == [0.0, 0.0]              # nothing to explain


def test_chitchat_backward_model_scores(tiny_chitchat):
    cc = load_model(str(tiny_chitchat))
    scores = backward_scores(cc, [("user", "你好吗")], ["我很好", "再见"])
    assert len(scores) == 2 and all(math.isfinite(s) and s < 0 for s in scores)
    sequences, starts = backward_sequences(cc, [("user", "你好吗")], ["我很好"])
    assert cc.tokenizer.convert_ids_to_tokens(sequences[0]) == ["[CLS]", "我", "很", "好", "[SEP]", "你", "好", "吗", "[SEP]"]
    assert starts == [5]


# --------------------------------------------------------------------------- end to end, rigged

class RiggedBackward(torch.nn.Module):
    """A backward "model" that explains the context perfectly after one favoured reply, and
    not at all (uniform) after any other."""

    def __init__(self, vocab_size: int, favoured_ids: list[int]):
        super().__init__()
        self.vocab_size = vocab_size
        self.favoured = favoured_ids
        self.config = SimpleNamespace(n_positions=256)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab_size)
        for b in range(batch):
            if input_ids[b, :len(self.favoured)].tolist() == self.favoured:
                logits[b, torch.arange(width - 1), input_ids[b, 1:]] = 30.0
        return SimpleNamespace(logits=logits)


def rigged(forward: LoadedModel, favoured_text: str) -> LoadedModel:
    fmt = forward.fmt
    ids = list(fmt.start_ids) + fmt.encode_text(favoured_text) + [fmt.turn_end_id]
    return LoadedModel(model=RiggedBackward(len(forward.tokenizer), ids), tokenizer=forward.tokenizer, fmt=fmt,
                       version="rigged", path="rigged", device=torch.device("cpu"))


async def test_rigged_backward_model_makes_its_candidate_win(forward, backward):
    turns = [("user", "do you have a dog ?")]
    async with MMIEngine(Engine(forward, SAMPLING), backward, candidates=6, weight=0.8) as mmi:
        first = await mmi.rerank(turns, {"seed": 11})
        texts = [c.text for c in first.candidates]
        distinct = sorted(set(t for t in texts if t))
        assert len(distinct) >= 2, texts
        # the forward model's least favourite candidate is the one the backward model will love
        target = min(distinct, key=lambda t: next(c.forward for c in first.candidates if c.text == t))
        forward_favourite = first.candidates[pick_best(texts, [c.forward for c in first.candidates],
                                                       [0.0] * len(texts), 0.0)].text
        assert target != forward_favourite

        mmi.swap_backward(rigged(forward, target))
        result = await mmi.rerank(turns, {"seed": 11})
        assert [c.text for c in result.candidates] == texts           # same seeds, same candidates
        assert result.reply.text == target == result.candidates[result.chosen].text
        bwd = {c.text: c.backward for c in result.candidates}
        assert bwd[target] > -0.01 and all(v < -5 for t, v in bwd.items() if t != target)
        # the answer is the candidate with the best combined score, whatever the weight
        for c in result.candidates:
            assert c.combined == pytest.approx(0.2 * c.forward + 0.8 * c.backward)
        assert result.candidates[result.chosen].combined == max(c.combined for c in result.candidates)
        # and reply() is the same path
        assert (await mmi.reply(turns, {"seed": 11})).text == target

        mmi.weight = 0.0  # forward only: the rigged backward model no longer counts
        assert (await mmi.reply(turns, {"seed": 11})).text == forward_favourite


async def test_several_chats_at_once_share_batches(forward, backward):
    n = 4
    batch_sizes = []
    hook = forward.model.register_forward_hook(
        lambda module, args, kwargs, out: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    chats = [[("user", d[0]), ("bot", d[1]), ("user", d[-1])] for d in DIALOGUES]
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=8, min_new_tokens=8)
    try:
        # fast_path="off": the hook counts rows of transformers' forward passes
        async with MMIEngine(Engine(forward, params, max_batch_size=32, fast_path="off"), backward, candidates=n,
                             weight=0.5) as mmi:
            results = await asyncio.gather(*[mmi.rerank(t, {"seed": 100 + 10 * i}) for i, t in enumerate(chats)])
            stats = mmi.stats()
    finally:
        hook.remove()
    assert max(batch_sizes) > n  # candidates of different chats were decoded in the same batch
    for turns, result in zip(chats, results):
        texts = [c.text for c in result.candidates]
        assert len(texts) == n and result.reply.text == texts[result.chosen]
        assert result.chosen == pick_best(texts, [c.forward for c in result.candidates],
                                          [c.backward for c in result.candidates], 0.5)
        # each chat was scored against its own context
        unique = list(dict.fromkeys(t for t in texts if t))
        expected = dict(zip(unique, backward_scores(backward, turns, unique)))
        for c in result.candidates:
            if c.text:
                assert c.backward == pytest.approx(expected[c.text], abs=1e-4)
    assert stats.replies == len(chats) and stats.mmi.candidates_generated == len(chats) * n
    assert stats.mmi.candidates == n and stats.mmi.weight == 0.5 and stats.mmi.backward_model == backward.version
    assert stats.latency_p50_s is not None and stats.latency_p50_s <= stats.latency_p95_s


def test_mmi_engine_is_a_model_engine_that_delegates_explicitly(forward, backward):
    engine = Engine(forward, SAMPLING, max_context_tokens=100)
    mmi = MMIEngine(engine, backward, candidates=2)
    assert isinstance(mmi, ReplyEngine) and isinstance(mmi, ModelEngine)
    assert mmi.model is engine.model and mmi.version == engine.version and mmi.defaults is engine.defaults
    assert mmi.max_context_tokens == 100 and mmi.max_batch_size == engine.max_batch_size
    assert not hasattr(mmi, "max_queue")  # nothing forwarded implicitly: the protocol is what it offers
    assert mmi.stats().mmi.backward_model == backward.version


async def test_greedy_or_one_candidate_skips_reranking(forward, backward):
    async with MMIEngine(Engine(forward, SAMPLING), backward, candidates=3) as mmi:
        result = await mmi.rerank([("user", "hello there")], {"do_sample": False})
        assert len(result.candidates) == 1
        result = await mmi.rerank([("user", "hello there")], {"seed": 1}, n=1)
        assert len(result.candidates) == 1
    with pytest.raises(ValueError, match="mmi_weight"):
        MMIEngine(Engine(forward), backward, weight=2.0)


async def test_mynah_open_wires_mmi_and_status_shows_it(tmp_path, tiny_dialogpt, backward):
    from bots.app import Mynah
    from bots.config import parse_config
    from bots.chat.events import Incoming

    raw = {"model": {"path": str(tiny_dialogpt)}, "storage": {"path": str(tmp_path / "db.sqlite3")},
           "generation": {"max_new_tokens": 6, "seed": 5, "mmi_model": backward.path, "mmi_candidates": 3}}
    app = await Mynah.open(parse_config(raw))
    try:
        assert isinstance(app.engine, MMIEngine) and app.chat.engine is app.engine
        out = await app.chat.handle(Incoming(platform="console", chat_id="c1", user_id="u1", text="hello there"))
        assert len(out) == 1 and out[0].text
        status = await app.chat.admin.status_text()
        assert "MMI reranking: on (3 candidates, weight 0.5" in status
        assert "over 1 reply" in status   # a reply counts once, not once per candidate
    finally:
        await app.close()

    raw["generation"] = {"max_new_tokens": 6}
    raw["storage"]["path"] = str(tmp_path / "db2.sqlite3")
    app = await Mynah.open(parse_config(raw))
    try:
        assert isinstance(app.engine, Engine)
        assert "MMI reranking: off" in await app.chat.admin.status_text()
    finally:
        await app.close()


# --------------------------------------------------------------------------- metrics

def test_generic_and_distinct_metrics_by_hand():
    assert is_stock("I don't know.") and is_stock("lol") and is_stock("haha ok!!") and is_stock("")
    assert not is_stock("i like to read books") and not is_stock("lol that dog is cute")
    assert is_echo("Hello there!", ["hello there", "hi"]) and not is_echo("hello", ["hello there"])
    assert distinct_n(["a b a", "b c"], 1) == pytest.approx(3 / 5)
    assert distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)   # (a b), (b a), (a b)
    replies = ["i don't know", "i like dogs", "hello there", "sure thing", "sure thing", "sure thing"]
    contexts = [["hi"], ["do you like dogs ?"], ["hello there"], ["x"], ["y"], ["z"]]
    m = reply_metrics(replies, contexts)
    assert m.stock_rate == pytest.approx(1 / 6) and m.echo_rate == pytest.approx(1 / 6)
    assert m.repeated_rate == pytest.approx(3 / 6) and m.generic_rate == pytest.approx(5 / 6)


# --------------------------------------------------------------------------- the commands

def _cli(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "scripts.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_generate_prints_n_samples_of_the_asked_length(tiny_dialogpt):
    result = _cli("generate", "--model", str(tiny_dialogpt), "--nsamples", "3", "--length", "5", "--temperature", "1.0",
                  "--top-k", "0", "--top-p", "1.0", "--repetition-penalty", "1.0", "--seed", "7")
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if " SAMPLE " in line]
    assert [h.strip("= ") for h in headers] == [f"SAMPLE {i} (5 tokens)" for i in (1, 2, 3)]

    result = _cli("generate", "--model", str(tiny_dialogpt), "--prompt", "hello there", "--nsamples", "3",
                  "--length", "5", "--seed", "7", "--json")
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(samples) == 3 and [s["tokens"] for s in samples] == [5, 5, 5]
    assert [s["seed"] for s in samples] == [7, 8, 9] and all(s["text"] for s in samples)
    again = _cli("generate", "--model", str(tiny_dialogpt), "--prompt", "hello there", "--nsamples", "3",
                 "--length", "5", "--seed", "7", "--json")
    assert again.stdout == result.stdout  # seeded: reproducible


def test_generate_unconditional_chitchat_and_mmi(tiny_chitchat, tiny_dialogpt, backward):
    result = _cli("generate", "--model", str(tiny_chitchat), "--nsamples", "2", "--length", "4", "--seed", "1", "--json")
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["tokens"] for s in samples] == [4, 4] and not any("[UNK]" in s["text"] for s in samples)
    tok = load_model(str(tiny_chitchat)).tokenizer  # one character per token: the printed text shows the length
    assert [len(tok.encode(s["text"], add_special_tokens=False)) for s in samples] == [4, 4]

    result = _cli("generate", "--model", str(tiny_dialogpt), "--prompt", "do you have a dog ?", "--nsamples", "2",
                  "--length", "6", "--stop-at-turn-end", "--mmi-model", backward.path, "--mmi-candidates", "3",
                  "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(samples) == 2 and [s["seed"] for s in samples] == [3, 6]
    assert all(1 <= s["tokens"] <= 6 for s in samples)


def test_eval_reports_rates_with_and_without_mmi(tmp_path, tiny_dialogpt, backward, capsys):
    from scripts.cli import main

    corpus = tmp_path / "held.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES * 3), encoding="utf-8")
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(tiny_dialogpt), "--mmi-model", backward.path, "--corpus", str(corpus),
                 "--valid-fraction", "0.5", "--prompts", "4", "--candidates", "3", "--max-new-tokens", "5",
                 "--distractors", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("no MMI (1 sample)", "forward rerank (w=0)", "MMI w=0.5 (configured)", "MMI w=1", "human reference"):
        assert row in text
    report = json.loads(out.read_text())
    assert report["prompts"] == 4 and report["candidates"] == 3
    assert set(report["table"]["no MMI (1 sample)"]) >= {"generic_rate", "distinct_1", "distinct_2"}
    assert all(len(d["candidates"]) == 3 for d in report["details"])
    assert report["retrieval"]["chance"] == pytest.approx(1 / 3) and 0 <= report["retrieval"]["recall_at_1_backward"] <= 1
    assert set(report["backward_loss"]) == {"reversed", "forward_order"}
