"""`mynah eval` without an MMI model: the chat-quality report, on a tiny chat-template model."""
from __future__ import annotations

import json

from scripts.quality import memory_chats
from tests.conftest import build_gguf_llama


def test_memory_chats_have_different_facts_asked_three_to_six_turns_later():
    chats = memory_chats(20, seed=1)
    assert len({tuple(a for _, a in c["probes"]) for c in chats}) == 20
    for chat in chats:
        users = [t for role, t in chat["turns"] if role == "user"]
        name, pet, city = (a for _, a in chat["probes"])
        assert name in users[0] and pet in users[1] and city in users[2]
        assert 3 <= len(users) - 2 <= 4 and 5 <= len(users) <= 6   # city asked 3-4 turns later, name 5-6


def test_eval_reports_memory_sentences_diversity_and_loss(tmp_path, capsys):
    from scripts.cli import main

    gguf_file, _ = build_gguf_llama(tmp_path / "tiny.gguf")
    config = tmp_path / "config.toml"
    config.write_text('[generation]\nmax_new_tokens = 6\n[chat]\ndefault_persona = "You are Mynah."\n', encoding="utf-8")
    out = tmp_path / "report.json"
    assert main(["--config", str(config), "eval", "--model", str(gguf_file), "--memory-chats", "3", "--prompts", "3",
                 "--loss-dialogues", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory-probe recall, without memory: " in printed and "with memory:" in printed
    assert "nats/char over " in printed and " chitchat dialogues" in printed
    report = json.loads(out.read_text())
    assert report["memory_with"]["facts"] == 9 and report["replies"]["prompts"] == 3
    assert 1 <= report["held_out_loss"]["dialogues"] <= 4 and report["held_out_loss"]["nats_per_char"] > 0 and report["history_turns"] == 12   # the chat-template window
