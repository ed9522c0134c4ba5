"""Feedback in training: replies people disliked never reach the next run's data."""
from __future__ import annotations

import json
import time

import pytest

from bots.config import parse_config
from bots.learning.export import BaseCorpus, export_dialogues
from engine.registry import Registry
from storage.store import Store
from storage.db import Database
from storage.feedback import Feedback


def make_config(tmp_path, **learning):
    return parse_config({
        "storage": {"path": str(tmp_path / "mynah.sqlite3")},
        "learning": {"enabled": True, "registry": str(tmp_path / "models"), "base_corpus": "",
                     "held_out_fraction": 0.2, **learning},
    })


async def talk(conv, chat_key: str, exchanges: list[tuple[str, str]]) -> list[int]:
    """Log user/bot exchanges in one chat; the bot replies get platform ids "<chat>-<n>"."""
    chat = await conv.chats.chat("telegram", chat_key)
    user = await conv.chats.user("telegram", chat_key)
    ids = []
    for n, (said, answered) in enumerate(exchanges):
        await conv.messages.log_message(chat, "user", said, user_id=user)
        ids.append(await conv.messages.log_message(chat, "bot", answered, model_version="v0001",
                                          platform_message_id=f"{chat_key}-{n}"))
    return ids


async def export(tmp_path, config, conv, run_id):
    registry = Registry(config.learning.registry)
    if registry.active() is None:
        registry.register_configured("starter")
    folder = registry.runs_dir() / f"run-{run_id:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    plan = await export_dialogues(conv, config.learning, registry.active(), run_id, folder, BaseCorpus())
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    return plan, rows


@pytest.mark.parametrize("weighting", ["drop", "weight", "off"])
async def test_negatively_rated_replies_are_absent_from_the_next_runs_training_data(tmp_path, weighting):
    config = make_config(tmp_path, feedback_weighting=weighting)
    db = await Database.open(config.storage.path)
    try:
        conv, fb = Store.over(db), Feedback(db)
        await talk(conv, "good", [("good morning", "LIKED-REPLY"), ("see you", "bye")])   # oldest: trained on
        for i in range(6):
            await talk(conv, f"plain{i}", [("hello there", "hi friend"), ("how are you ?", "fine thanks")])
        await talk(conv, "bad", [("hello there", "hi friend"), ("what do you like ?", "DISLIKED-REPLY"),
                                 ("do you have a dog ?", "yes a small dog")])
        await talk(conv, "what", [("where do you live ?", "CONFUSING-REPLY"), ("what?", "sorry, in a city")])
        assert await fb.set_signals("telegram", "bad", "bad-1", "someone", {"reaction:👎": -1}) == 1
        assert await fb.set_signals("telegram", "good", "good-0", "good", {"button": 1}) == 1
        assert await fb.derive_implicit(300, now=time.time() + 301) > 0   # "what?" after CONFUSING-REPLY
        plan, rows = await export(tmp_path, config, conv, 1)
        text = json.dumps(rows, ensure_ascii=False)
        train = [r for r in rows if r["split"] == "train"]
        if weighting == "off":
            assert "DISLIKED-REPLY" in text and "CONFUSING-REPLY" in text
            return
        assert "DISLIKED-REPLY" not in text and "CONFUSING-REPLY" not in text
        # the rest of that conversation is kept, as separate pieces around the cut
        assert ["do you have a dog ?", "yes a small dog"] in [r["turns"] for r in rows]
        assert ["hello there", "hi friend", "what do you like ?"] in [r["turns"] for r in rows]
        assert plan.counts["feedback_negative_cut"] == 2
        liked = [r for r in train if "LIKED-REPLY" in r["turns"]]
        assert len(liked) == (2 if weighting == "weight" else 1)   # weighted up in the training split only
    finally:
        await db.close()
