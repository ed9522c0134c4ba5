"""Console chat driven through a pipe, the way a script would use it."""
from __future__ import annotations

import os
import subprocess
import sqlite3
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\npath = "{model}"\n[storage]\npath = "{tmp_path / "db.sqlite3"}"\n'
        "[generation]\nmax_new_tokens = 8\nseed = 3\n",
        encoding="utf-8",
    )
    return config


def chat(config: Path, lines: list[str], *extra: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "--config", str(config), "chat", "--session", "tester", *extra],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_pipe_gets_one_line_per_message_and_remembers_after_restart(tmp_path, tiny_dialogpt):
    config = write_config(tmp_path, tiny_dialogpt)
    out = chat(config, ["hello there", "what do you like to do ?", "", "/help"])
    assert len(out) == 4 and all(line.strip() for line in out)
    assert "/reset" in out[3]

    db = sqlite3.connect(tmp_path / "db.sqlite3")
    rows = db.execute("SELECT m.role, m.text FROM messages m JOIN chats c ON c.id = m.chat_id "
                      "WHERE c.platform = 'console' ORDER BY m.id").fetchall()
    assert [r for r in rows if r[0] == "user"] == [("user", "hello there"), ("user", "what do you like to do ?")]
    assert len([r for r in rows if r[0] == "bot"]) == 2

    # a new process: the context of the earlier run is still there and grows
    chat(config, ["i like books"])
    texts = [r[0] for r in db.execute("SELECT text FROM messages WHERE role='user' ORDER BY id")]
    assert texts == ["hello there", "what do you like to do ?", "i like books"]


def test_reset_then_context_starts_afresh(tmp_path, tiny_dialogpt):
    import asyncio

    from storage.conversations import Conversations
    from storage.db import Database

    config = write_config(tmp_path, tiny_dialogpt)
    chat(config, ["first message", "/reset", "second message"])

    async def context():
        db = await Database.open(tmp_path / "db.sqlite3")
        conv = Conversations(db)
        chat_id = await conv.chat("console", "tester")
        turns = await conv.context(chat_id, 10)
        await db.close()
        return turns

    turns = asyncio.run(context())
    assert [t.text for t in turns if t.role == "user"] == ["second message"]


def test_missing_model_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, tmp_path / "no-such-model")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "--config", str(config), "chat"],
                            input="hi\n", capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 1
    assert "model folder not found" in result.stdout + result.stderr


@pytest.mark.parametrize("bad, message", [
    ('[generation]\ntemperature = "hot"\n', "temperature must be a number"),
    ('[generation]\ntop_p = 1.5\n', "top_p must be in"),
    ('[model]\nformat = "xml"\n', "format must be one of"),
    ('[storage]\npth = "x"\n', "unknown key"),
    ('[learning]\nschedule = "sometimes"\n', "neither an interval"),
    ('[generation]\nmmi_weight = 2.0\n', "mmi_weight must be in [0, 1]"),
])
def test_bad_config_value_is_named(tmp_path, bad, message):
    config = tmp_path / "config.toml"
    config.write_text(bad, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "--config", str(config), "chat"],
                            input="", capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert result.returncode == 2
    assert message in result.stderr


def test_piped_lines_are_not_counted_as_feedback(tmp_path, tiny_dialogpt):
    """A script's next line is no reaction: a piped "what?" must not make the reply before it
    negative, nor a piped line make it "continued"."""
    import asyncio
    import time

    from bots.config import load_config
    from bots.feedback import FeedbackRecorder
    from storage.db import Database
    from storage.feedback import Feedback, summarize

    config = write_config(tmp_path, tiny_dialogpt)
    assert len(chat(config, ["hello there", "what?", "hello again"])) == 3

    async def rated():
        db = await Database.open(str(tmp_path / "db.sqlite3"))
        try:
            recorder = FeedbackRecorder(load_config(config).feedback, Feedback(db))
            await recorder.derive(now=time.time() + 86400)      # every window has passed
            return summarize(await recorder.store.scores())
        finally:
            await db.close()

    (version,) = asyncio.run(rated()).values()
    assert version.replies == 3 and (version.evaluated, version.negative, version.positive) == (0, 0, 0)
