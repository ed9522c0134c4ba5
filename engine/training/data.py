"""Corpus readers and the data preparation shared by `mynah preprocess` and `mynah train`.

Every reader yields dialogues as ``list[str]``, one utterance per element, already cleaned:
whitespace collapsed, empty utterances dropped, dialogues with fewer than two turns dropped
(a single turn teaches nothing about replying).

Training sequences are *windows*: runs of whole turns that fit ``max_len`` tokens. A long
dialogue becomes several windows, each starting at a turn boundary (GPT2-chitchat simply
truncated it; we keep everything).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from engine.types import Dialogue


# --------------------------------------------------------------------------- readers

def clean_dialogue(utterances: Iterable[str], min_turns: int = 2) -> Dialogue | None:
    """Collapse whitespace, drop empty utterances; None when too few turns remain."""
    turns = [" ".join(str(u).split()) for u in utterances]
    turns = [t for t in turns if t]
    return turns if len(turns) >= min_turns else None


def read_chitchat_dataset(path: str | Path | None = None, min_turns: int = 2) -> Iterator[Dialogue]:
    """The PyPI `chitchat_dataset` corpus (7,168 conversations; 4,017 have two turns or more).

    Each inner list of "messages" is one speaker's turn: its texts are joined with a space.
    """
    if path is None:
        import chitchat_dataset

        path = Path(chitchat_dataset.__file__).parent / "dataset.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for conversation in data.values():
        turns = (" ".join(m["text"] for m in turn) for turn in conversation["messages"])
        dialogue = clean_dialogue(turns, min_turns)
        if dialogue:
            yield dialogue


def read_train_txt(path: str | Path, min_turns: int = 2) -> Iterator[Dialogue]:
    """GPT2-chitchat's train.txt: one utterance per line, dialogues separated by a blank line."""
    current: list[str] = []
    with open(path, encoding="utf-8-sig") as f:  # text mode turns \r\n into \n; -sig drops a BOM
        for line in f:
            if line.strip():
                current.append(line)
                continue
            dialogue = clean_dialogue(current, min_turns)
            if dialogue:
                yield dialogue
            current = []
    dialogue = clean_dialogue(current, min_turns)
    if dialogue:
        yield dialogue


def read_jsonl(path: str | Path, min_turns: int = 2) -> Iterator[Dialogue]:
    """One dialogue per line: a JSON list of strings, or {"turns": [...]} / {"dialogue": [...]}."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if isinstance(item, dict):
                item = item.get("turns", item.get("dialogue"))
            if not isinstance(item, list):
                raise ValueError(f"{path}:{number}: expected a list of utterances or an object with 'turns' or 'dialogue'")
            turns = [t.get("text", "") if isinstance(t, dict) else t for t in item]
            dialogue = clean_dialogue(turns, min_turns)
            if dialogue:
                yield dialogue


def read_corpus(spec: str, min_turns: int = 2) -> Iterator[Dialogue]:
    """"chitchat" → the chitchat_dataset package; *.txt → train.txt format; *.jsonl → JSON lines."""
    if spec == "chitchat":
        return read_chitchat_dataset(min_turns=min_turns)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"unknown corpus {spec!r}: use 'chitchat', a train.txt-style *.txt file or a *.jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {spec}")
    return read_train_txt(path, min_turns) if suffix == ".txt" else read_jsonl(path, min_turns)


def read_corpora(specs: Sequence[str]) -> list[Dialogue]:
    """All dialogues of several corpora, in order."""
    dialogues: list[Dialogue] = []
    for spec in specs:
        dialogues.extend(read_corpus(spec))
    return dialogues


# --------------------------------------------------------------------------- preparation

def split_by_conversation(dialogues: Sequence[Dialogue], valid_fraction: float = 0.05, seed: int = 0) -> tuple[list[Dialogue], list[Dialogue]]:
    """Shuffle whole dialogues into (train, valid): no conversation is in both halves."""
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    n_valid = round(len(order) * valid_fraction)
    if valid_fraction > 0 and len(order) >= 2:
        n_valid = min(max(n_valid, 1), len(order) - 1)  # both halves non-empty
    valid = [dialogues[i] for i in sorted(order[:n_valid])]
    train = [dialogues[i] for i in sorted(order[n_valid:])]
    return train, valid


def reverse_turns(dialogues: Iterable[Dialogue]) -> list[Dialogue]:
    """Newest turn first: the data of an MMI backward model (GPT2-chitchat --train_mmi)."""
    return [list(reversed(d)) for d in dialogues]


def turn_ids(fmt, utterances: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prefix, one id list per turn) so windows can be cut at turn boundaries.

    A chat template has no clean per-turn pieces: the whole dialogue is one piece there.
    """
    if fmt.name == "chat_template":
        return [], [fmt.dialogue_ids(utterances)]
    from engine.dialogue import encode_plain

    # one batched call; a typed "<|endoftext|>" or "[SEP]" stays text, never a turn boundary
    encoded = encode_plain(fmt.tokenizer, list(utterances))
    return list(fmt.start_ids), [ids + [fmt.turn_end_id] for ids in encoded]


def windows(ids_per_dialogue: Iterable[Sequence[Sequence[int]]], max_len: int, prefix: Sequence[int] = ()) -> list[list[int]]:
    """Pack each dialogue's turns into sequences of at most max_len tokens.

    ids_per_dialogue holds, per dialogue, one id list per turn. Each window is ``prefix``
    (e.g. [CLS]) plus consecutive whole turns; a dialogue that does not fit becomes several
    windows, each starting at a turn boundary. A single turn longer than a window is cut
    into window-sized pieces, so no token is lost.
    """
    prefix = list(prefix)
    budget = max_len - len(prefix)
    if budget <= 0:
        raise ValueError(f"max_len {max_len} leaves no room after a {len(prefix)}-token prefix")
    out: list[list[int]] = []
    for turns in ids_per_dialogue:
        pieces = [list(t[i:i + budget]) for t in turns for i in range(0, len(t), budget)]
        current: list[int] = []
        for piece in pieces:
            if current and len(current) + len(piece) > budget:
                out.append(prefix + current)
                current = []
            current += piece
        if current:
            out.append(prefix + current)
    return out


def encode_windows(fmt, dialogues: Iterable[Dialogue], max_len: int, progress: str | None = None) -> list[list[int]]:
    """Dialogues → training windows in the given DialogueFormat (tqdm bar if progress names it)."""
    dialogues = list(dialogues)
    if progress:
        from tqdm import tqdm

        dialogues = tqdm(dialogues, desc=progress, unit="dlg", mininterval=1.0)
    out: list[list[int]] = []
    for dialogue in dialogues:
        prefix, turns = turn_ids(fmt, dialogue)
        out += windows([turns], max_len, prefix)
    return out


@dataclass
class PreparedData:
    """Token windows ready to train on, plus the counts worth reporting."""

    train: list[list[int]]
    valid: list[list[int]]
    counts: dict = field(default_factory=dict)


def prepare(fmt, dialogues: Sequence[Dialogue], max_len: int, valid_fraction: float = 0.05, seed: int = 0,
            reverse: bool = False, progress: bool = False, valid: Sequence[Dialogue] | None = None) -> PreparedData:
    """Split by conversation (unless a held-out `valid` set is given), optionally reverse, encode into windows."""
    if valid is None:
        train_d, valid_d = split_by_conversation(dialogues, valid_fraction, seed)
    else:
        train_d, valid_d = list(dialogues), list(valid)
    if reverse:
        train_d, valid_d = reverse_turns(train_d), reverse_turns(valid_d)
    train = encode_windows(fmt, train_d, max_len, "encode train" if progress else None)
    valid = encode_windows(fmt, valid_d, max_len, "encode valid" if progress else None)
    counts = {
        "dialogues": {"train": len(train_d), "valid": len(valid_d)},
        "windows": {"train": len(train), "valid": len(valid)},
        "tokens": {"train": sum(map(len, train)), "valid": sum(map(len, valid))},
    }
    return PreparedData(train, valid, counts)


def train_tokenizer(kind: str, dialogues: Sequence[Dialogue], vocab_size: int, folder: str | Path | None = None):
    """A fresh tokenizer for training from scratch: "bpe" (DialoGPT) or "wordpiece" (chitchat)."""
    from engine.tokenizer import train_bpe_tokenizer, train_wordpiece_tokenizer

    texts = (u for d in dialogues for u in d)
    if kind == "bpe":
        return train_bpe_tokenizer(texts, vocab_size)
    if kind == "wordpiece":
        return train_wordpiece_tokenizer(texts, vocab_size, folder)
    raise ValueError(f"unknown tokenizer type {kind!r}: use bpe or wordpiece")


# --------------------------------------------------------------------------- storage

def save_sequences(path: str | Path, sequences: Sequence[Sequence[int]]) -> None:
    """Compact form: one flat int32 tensor of ids plus int64 offsets (n + 1 of them)."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([i for s in sequences for i in s], dtype=torch.int32)
    torch.save({"ids": ids, "offsets": offsets}, path)


def load_sequences(path: str | Path) -> list[list[int]]:
    blob = torch.load(path, weights_only=True)
    ids, offsets = blob["ids"].tolist(), blob["offsets"].tolist()
    return [ids[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def save_prepared(folder: str | Path, data: PreparedData, tokenizer, meta: dict) -> dict:
    """DIR/train.pt, DIR/valid.pt, the tokenizer files and DIR/preprocess.json (returned)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_sequences(folder / "train.pt", data.train)
    save_sequences(folder / "valid.pt", data.valid)
    tokenizer.save_pretrained(str(folder))  # the data is only meaningful with its tokenizer
    info = {**meta, **data.counts}
    (folder / "preprocess.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def load_prepared(folder: str | Path) -> tuple[PreparedData, dict]:
    """What save_prepared wrote (the tokenizer is loaded separately with engine.model.load_tokenizer)."""
    folder = Path(folder)
    info_file = folder / "preprocess.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{folder} is not a preprocessed data folder (no preprocess.json); run `mynah preprocess`")
    info = json.loads(info_file.read_text(encoding="utf-8"))
    data = PreparedData(load_sequences(folder / "train.pt"), load_sequences(folder / "valid.pt"),
                        {k: info[k] for k in ("dialogues", "windows", "tokens") if k in info})
    return data, info
