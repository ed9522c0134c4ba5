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


def test_the_console_operator_is_not_rate_limited(tmp_path, tiny_dialogpt):
    """Issue 25 #14: README's piped example hit "faster than I can think" at line 9."""
    config = write_config(tmp_path, tiny_dialogpt)
    config.write_text(config.read_text(encoding="utf-8") + "[chat]\nrate_limit_messages = 2\n", encoding="utf-8")
    lines = [f"line number {i}" for i in range(6)] + ["/help", "/reset", "one more"]
    out = chat(config, lines)
    assert len(out) == len(lines)
    assert not [line for line in out if "faster than I can think" in line]


def test_reset_then_context_starts_afresh(tmp_path, tiny_dialogpt):
    import asyncio

    from storage.store import Store
    from storage.db import Database

    config = write_config(tmp_path, tiny_dialogpt)
    chat(config, ["first message", "/reset", "second message"])

    async def context():
        db = await Database.open(tmp_path / "db.sqlite3")
        conv = Store.over(db)
        chat_id = await conv.chats.chat("console", "tester")
        turns = await conv.messages.context(chat_id, 10)
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


def run_chat(config: Path, stdin: str = "hi\n") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "scripts.cli", "--config", str(config), "chat"],
                          input=stdin, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_unusable_storage_path_is_one_line_naming_the_key(tmp_path, tiny_dialogpt):
    """Issue 25 item 18: a folder that cannot exist is a one-line error, not a traceback."""
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_dialogpt}"\n[storage]\npath = "/proc/1/nope/x.sqlite3"\n',
                      encoding="utf-8")
    result = run_chat(config)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if "[storage] path" in line]
    assert len(errors) == 1 and "/proc/1/nope/x.sqlite3" in errors[0], out


def test_corrupt_database_error_suggests_restore(tmp_path, tiny_dialogpt):
    """Issue 25 item 21: what to do about a damaged database is in the error itself."""
    config = write_config(tmp_path, tiny_dialogpt)
    (tmp_path / "db.sqlite3").write_bytes(b"this is not a database at all " * 200)
    result = run_chat(config)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out
    assert "mynah restore" in out and "[storage] path" in out, out


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
