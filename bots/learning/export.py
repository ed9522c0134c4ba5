"""A run's training data: what is new since the active version, replay, and the held-out slice.

Only opted-in chats are exported (storage filters them), and messages deleted by /forget
are gone from the table and filtered again by id. The new dialogues are split by
conversation, the newest slice held out (never trained on), and mixed with a replay
sample of older logs and of the base corpus so the model does not forget. The base
corpus's evaluation sample is fixed (BASE_SAMPLE_SEED), so runs are scored alike.

The exported text lives in the run folder only while the run needs it: data.jsonl is
deleted when the run ends, and again by recovery after a crash.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bots.learning import feedback_filter
from engine.registry import Version, write_jsonl_atomic

BASE_SAMPLE_SEED = 1234        # the base-corpus evaluation sample never changes between runs
DATA_FILE = "data.jsonl"
FORGOTTEN_FILE = "forgotten.json"


@dataclass
class ExportPlan:
    """What a run will train on, as the rest of the run needs it."""
    counts: dict                          # the run row's data: base_version, after, through, new_dialogues, …
    through: int                          # the newest message id the export saw (the next watermark)
    skip: str = ""                        # why there is nothing to train on ("" = go ahead)
    ids: set[int] = field(default_factory=set)     # the exported logged message ids (the /forget veto)
    chats: set[int] = field(default_factory=set)   # the exported chats (the /optout veto)


class BaseCorpus:
    """[learning] base_corpus, shuffled once with a fixed seed and kept in memory."""

    def __init__(self):
        self._cache: tuple[str, list[list[str]]] | None = None

    def split(self, spec: str, n_eval: int) -> tuple[list[list[str]], list[list[str]]]:
        """(the fixed evaluation sample, the rest for replay); blocking: call from a thread."""
        if not spec:
            return [], []
        if self._cache is None or self._cache[0] != spec:
            from engine.training.data import read_corpus

            dialogues = list(read_corpus(spec))
            random.Random(BASE_SAMPLE_SEED).shuffle(dialogues)
            self._cache = (spec, dialogues)
        dialogues = self._cache[1]
        n = min(n_eval, len(dialogues))
        return dialogues[:n], dialogues[n:]


async def export_dialogues(conversations, lc, active: Version, run_id: int, folder: Path,
                           base_corpus: BaseCorpus) -> ExportPlan:
    """Write folder/data.jsonl (splits train / held_out / base_eval) and return the plan.

    `lc` is the [learning] config; `run_id` seeds the replay sample and the shuffle."""
    watermark = active.trained_through
    snapshot = await conversations.max_message_id()
    forgotten = await conversations.forgotten_message_ids()
    new = [d for d in await conversations.export_dialogues(after_message_id=watermark)
           if not forgotten.intersection(d.message_ids)]
    old = []
    if lc.replay_fraction > 0 and watermark > 0:
        old = [d for d in await conversations.export_dialogues()
               if d.last_message_id <= watermark and not forgotten.intersection(d.message_ids)]
    rated = await feedback_filter.apply(conversations, lc, new, old)   # disliked replies cut out
    new, old = rated.new, rated.old
    through = max([snapshot] + [d.last_message_id for d in new])
    counts = {"base_version": active.name, "after": watermark, "through": through, "new_dialogues": len(new),
              "new_user_messages": await conversations.count_user_messages(after_message_id=watermark)}
    if len(new) < 2:
        return ExportPlan(counts, through, skip=f"only {len(new)} new dialogue(s) since {active.name}; at least 2 "
                                                "are needed (one to train on, one to hold out)")
    n_held = min(max(1, round(len(new) * lc.held_out_fraction)), len(new) - 1)
    held_out, new_train = new[-n_held:], new[:-n_held]
    new_train = rated.weighted(new_train)
    rng = random.Random(run_id)
    replay_old = rng.sample(old, min(len(old), round(lc.replay_fraction * len(new_train))))
    base_eval, base_pool = await asyncio.to_thread(base_corpus.split, lc.base_corpus, lc.base_eval_dialogues)
    replay_base = rng.sample(base_pool, min(len(base_pool), round(lc.base_replay_fraction * len(new_train))))
    counts.update({"train_new": len(new_train), "held_out": len(held_out), "replay_old": len(replay_old),
                   "replay_base": len(replay_base), "base_eval": len(base_eval), **rated.counts})
    rows = ([{"split": "train", "turns": d.turns, "ids": d.message_ids} for d in new_train + replay_old]
            + [{"split": "train", "turns": t, "ids": []} for t in replay_base]
            + [{"split": "held_out", "turns": d.turns, "ids": d.message_ids} for d in held_out]
            + [{"split": "base_eval", "turns": t, "ids": []} for t in base_eval])
    rng.shuffle(rows)  # the child keeps the split labels; order within a split does not matter
    await asyncio.to_thread(write_jsonl_atomic, folder / DATA_FILE, rows)
    logged = new_train + replay_old + held_out
    return ExportPlan(counts, through, ids={i for d in logged for i in d.message_ids},
                      chats={d.chat_id for d in logged})


async def changed_since_export(conversations, plan: ExportPlan) -> str | None:
    """Privacy: a /forget or /optout that came after the export vetoes the candidate; why, or None."""
    forgotten = await conversations.forgotten_message_ids()
    if forgotten & plan.ids:
        return "some exported messages were deleted by /forget during the run; the candidate was dropped"
    if plan.chats and await conversations.consenting_chats(plan.chats) != plan.chats:
        return "a chat in the training data ran /optout during the run; the candidate was dropped"
    return None


def strip_run_folder(folder: Path, keep_candidate: bool = False) -> None:
    """Delete the exported text and the candidate weights; keep the log, job, result, curve."""
    for name in (DATA_FILE, FORGOTTEN_FILE):
        for path in [folder / name, folder / f"{name}.tmp", *folder.glob(f".{name}.tmp-*")]:
            with contextlib.suppress(OSError):
                path.unlink()
    if not keep_candidate:
        for path in folder.glob("candidate*"):
            shutil.rmtree(path, ignore_errors=True)


def tidy_run_folders(runs: Path, keep: int) -> None:
    """Strip every run folder (a crash may have left exported text) and keep the newest `keep`."""
    if not runs.is_dir():
        return
    folders = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("run-"))
    for folder in folders:
        strip_run_folder(folder)
    for folder in folders[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
