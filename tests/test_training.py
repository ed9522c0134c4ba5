"""Training pipeline: corpus readers, windows, the training loop, saved folders, the CLI.

Every model here is tiny (1 layer × 32) so each test runs in a second or two on 2 cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.training.data import (encode_windows, load_prepared, prepare, read_chitchat_dataset, read_corpus, read_jsonl,
                         read_train_txt, reverse_turns, split_by_conversation, turn_ids, windows)
from engine.dialogue import DialogueFormat
from engine.training.train import TrainConfig, evaluate_loss, train

LINES = [
    "hello there", "hi , how are you ?", "i am fine thanks", "what do you like to do ?",
    "i like to read books", "do you have a dog ?", "yes i have a small dog", "that is nice",
    "where do you live ?", "i live in a big city", "what is your name ?", "my name is mynah",
]
DIALOGUES = [LINES[i:i + 3] for i in range(0, len(LINES), 3)] * 6  # 24 short dialogues, repeated content
CHINESE = [["你好", "你好吗", "我很好谢谢"], ["你喜欢什么", "我喜欢看书"], ["今天天气很好", "是的很好"], ["再见", "晚安"]] * 5

TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, max_len=64, vocab_size=300, batch_size=8,
            eval_batch_size=16, progress=False, threads=1, valid_fraction=0.25)


def write_train_txt(path: Path, dialogues, newline="\n") -> Path:
    path.write_text(newline.join(newline.join(d) + newline for d in dialogues), encoding="utf-8", newline="")
    return path


# --------------------------------------------------------------------------- readers

def test_read_train_txt_chinese_crlf(tmp_path):
    path = tmp_path / "train.txt"
    text = "你好\r\n你好吗\r\n  \r\n我很好\r\n\r\n\r\n只有一句\r\n\r\n今天天气  很好\r\n是的"
    path.write_bytes(text.encode("utf-8"))
    assert list(read_train_txt(path)) == [["你好", "你好吗"], ["今天天气 很好", "是的"]]
    # a whitespace-only line separates dialogues; "我很好" and "只有一句" alone are dropped


def test_read_jsonl_shapes_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [["a", "b"], {"turns": ["c", "", "d"]}, {"dialogue": [{"text": "e"}, {"text": "f"}]}, ["only one"]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(read_jsonl(path)) == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert list(read_corpus(str(path))) == [["a", "b"], ["c", "d"], ["e", "f"]]
    path.write_text('["a", "b"]\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=":2:"):
        list(read_jsonl(path))


def test_read_chitchat_package():
    dialogues = list(read_corpus("chitchat"))
    assert len(dialogues) == 4017  # the 3,151 one-sided conversations have a single turn
    assert all(len(d) >= 2 and all(u.strip() for u in d) for d in dialogues)
    assert len(list(read_chitchat_dataset(min_turns=1))) > 7000


def test_read_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus"):
        read_corpus(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_corpus(str(tmp_path / "missing.txt"))


# --------------------------------------------------------------------------- preparation

def test_split_is_by_conversation():
    dialogues = [[f"a{i}", f"b{i}"] for i in range(100)]
    train_d, valid_d = split_by_conversation(dialogues, 0.2, seed=1)
    assert len(valid_d) == 20 and len(train_d) == 80
    assert not {tuple(d) for d in train_d} & {tuple(d) for d in valid_d}
    assert sorted(train_d + valid_d) == sorted(dialogues)
    assert split_by_conversation(dialogues, 0.2, seed=1) == (train_d, valid_d)


def test_windows_keep_whole_turns():
    turns = [[1, 2, 0], [3, 0], [4, 5, 6, 0], [7, 0]]
    out = windows([turns], max_len=6, prefix=[9])
    assert out == [[9, 1, 2, 0, 3, 0], [9, 4, 5, 6, 0], [9, 7, 0]]
    assert all(len(w) <= 6 and w[0] == 9 for w in out)
    assert [i for w in out for i in w[1:]] == [i for t in turns for i in t]  # nothing lost
    boundaries = {0, 3, 5, 9}  # token offsets where a turn starts
    offset = 0
    for w in out:
        assert offset in boundaries
        offset += len(w) - 1
    # a turn longer than a window is cut into pieces rather than dropped
    assert windows([[[1] * 7 + [0]]], max_len=4) == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_reverse_and_chitchat_prefix(tmp_path):
    from engine.tokenizer import train_wordpiece_tokenizer

    tok = train_wordpiece_tokenizer([u for d in CHINESE for u in d], 200, tmp_path / "vocab")
    fmt = DialogueFormat(tok)
    assert fmt.name == "chitchat"
    data = prepare(fmt, CHINESE[:4], max_len=64, valid_fraction=0, reverse=True)
    expected = encode_windows(fmt, reverse_turns(CHINESE[:4]), 64)
    assert data.train == expected and data.valid == []
    first = tok.decode(data.train[0])
    assert first.startswith("[CLS]") and first.replace(" ", "").startswith("[CLS]我很好谢谢[SEP]你好吗[SEP]你好[SEP]")
    prefix, turns = turn_ids(fmt, CHINESE[0])
    assert prefix + [i for t in turns for i in t] == fmt.dialogue_ids(CHINESE[0])


# --------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory):
    """One tiny from-scratch run shared by the tests that inspect its result."""
    out = tmp_path_factory.mktemp("runs") / "scratch"
    events = []
    metrics = train(TrainConfig(output=str(out), dialogues=DIALOGUES, lr=1e-2, max_steps=30, eval_every=10,
                                warmup_steps=0, log_every=5, on_progress=events.append, **TINY))
    return out, metrics, events


def test_loss_falls_from_scratch(scratch_run):
    _, metrics, events = scratch_run
    assert metrics["best_valid_loss"] < metrics["initial_valid_loss"] - 1.0
    assert metrics["steps"] == 30 and not metrics["stopped_early"]
    assert [h[0] for h in metrics["history"]] == [0, 10, 20, 30]
    assert metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0 and metrics["params"] > 0
    assert {"eval", "step", "done"} <= {e.kind for e in events}


def test_saved_folder_reloads_and_generates(scratch_run):
    from engine.model import load_model

    out, metrics, _ = scratch_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_valid_loss"] == pytest.approx(metrics["best_valid_loss"])
    assert saved["config"]["n_layer"] == 1
    assert not list(out.parent.glob("scratch.tmp-*"))

    loaded = load_model(str(out), device="cpu")
    assert loaded.fmt.name == "dialogpt"
    prompt = torch.tensor([loaded.fmt.context_ids([("user", "hello there")], 32)])
    result = loaded.model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=loaded.fmt.pad_id)
    assert result.shape[1] > prompt.shape[1]
    # the reloaded model scores the held-out data as training reported (best weights were kept)
    loss = evaluate_loss(loaded.model, loaded.fmt, DIALOGUES, batch_size=8, max_len=64)
    assert loss < metrics["initial_valid_loss"]


def test_early_stopping_with_zero_lr(tmp_path):
    metrics = train(TrainConfig(output=str(tmp_path / "m"), dialogues=DIALOGUES, lr=0.0, max_steps=50,
                                eval_every=2, patience=1, **TINY))
    assert metrics["stopped_early"] and metrics["steps"] == 2
    assert metrics["best_valid_loss"] == pytest.approx(metrics["initial_valid_loss"])


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(FileExistsError):
        train(TrainConfig(output=str(out), dialogues=DIALOGUES, max_steps=1, **TINY))
    metrics = train(TrainConfig(output=str(out), overwrite=True, dialogues=DIALOGUES, max_steps=1,
                                save_dtype="float16", **TINY))
    assert (out / "model.safetensors").is_file() and metrics["steps"] == 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_chitchat_format_wordpiece_chinese(tmp_path):
    from engine.model import load_model

    corpus = write_train_txt(tmp_path / "train.txt", CHINESE, newline="\r\n")
    metrics = train(TrainConfig(output=str(tmp_path / "zh"), corpus=[str(corpus)], format="chitchat", lr=1e-2,
                                max_steps=10, eval_every=5, **TINY))
    assert metrics["format"] == "chitchat" and metrics["best_valid_loss"] < metrics["initial_valid_loss"]
    loaded = load_model(str(tmp_path / "zh"), device="cpu")
    assert loaded.fmt.name == "chitchat"
    assert len(loaded.tokenizer.get_vocab()) > 20 and "好" in loaded.tokenizer.get_vocab()
    prompt = torch.tensor([loaded.fmt.context_ids([("user", "你好")], 32)])
    assert loaded.model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] > prompt.shape[1]


FINE_TUNE = {k: v for k, v in TINY.items() if not k.startswith("n_")}


def test_fine_tune_existing_model_on_own_valid_set(tmp_path, tiny_dialogpt):
    from engine.model import load_model

    held_out = [LINES[:2], LINES[4:6]]
    metrics = train(TrainConfig(output=str(tmp_path / "ft"), init=str(tiny_dialogpt), dialogues=DIALOGUES,
                                valid_dialogues=held_out, lr=1e-3, max_steps=4, eval_every=2, **FINE_TUNE))
    assert metrics["steps"] == 4 and metrics["best_valid_loss"] <= metrics["initial_valid_loss"]
    assert metrics["data"]["dialogues"] == {"train": len(DIALOGUES), "valid": 2}
    before, after = load_model(str(tiny_dialogpt)), load_model(str(tmp_path / "ft"))
    assert before.tokenizer.get_vocab() == after.tokenizer.get_vocab()
    # evaluate_loss on dialogues gives what training reported for the same held-out set
    assert evaluate_loss(after.model, after.fmt, held_out) == pytest.approx(metrics["best_valid_loss"], rel=1e-4)


def test_fine_tune_gpt2_chitchat_checkpoint(tmp_path, tiny_chitchat):
    from engine.model import load_model

    metrics = train(TrainConfig(output=str(tmp_path / "ft"), init=str(tiny_chitchat), dialogues=CHINESE, lr=1e-3,
                                max_steps=2, eval_every=2, **FINE_TUNE))
    assert metrics["format"] == "chitchat"
    loaded = load_model(str(tmp_path / "ft"))
    assert loaded.fmt.name == "chitchat" and len(loaded.tokenizer.get_vocab()) == len(load_model(str(tiny_chitchat)).tokenizer)


# --------------------------------------------------------------------------- command line

def test_cli_preprocess_then_train(tmp_path, capsys):
    from scripts.cli import main

    corpus = write_train_txt(tmp_path / "train.txt", DIALOGUES)
    data_dir = tmp_path / "data"
    assert main(["preprocess", "--corpus", str(corpus), "--vocab-size", "300", "--max-len", "64",
                 "--valid-fraction", "0.25", "--output", str(data_dir)]) == 0
    info = json.loads((data_dir / "preprocess.json").read_text())
    assert info["dialogues"] == {"train": 18, "valid": 6} and info["format"] == "dialogpt"
    data, _ = load_prepared(data_dir)
    assert len(data.train) == info["windows"]["train"] and sum(map(len, data.train)) == info["tokens"]["train"]

    args = ["train", "--data", str(data_dir), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--n-positions", "64", "--max-steps", "3", "--eval-every", "2", "--threads", "2", "--no-progress",
            "--output", str(tmp_path / "model")]
    assert main(args) == 0
    assert "best valid loss" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert main(args) == 1  # exists, no --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_cli_train_reverse_from_corpus(tmp_path):
    from scripts.cli import main

    corpus = tmp_path / "d.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in DIALOGUES), encoding="utf-8")
    assert main(["train", "--corpus", str(corpus), "--reverse", "--vocab-size", "300", "--n-layer", "1",
                 "--n-embd", "32", "--n-head", "2", "--n-positions", "64", "--max-len", "64", "--max-steps", "2",
                 "--no-progress", "--output", str(tmp_path / "mmi")]) == 0
    metrics = json.loads((tmp_path / "mmi" / "metrics.json").read_text())
    assert metrics["data"]["reverse"] is True and metrics["config"]["reverse"] is True
