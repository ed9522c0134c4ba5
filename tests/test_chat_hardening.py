"""The chat path under races and odd input (issue 25), through the real ChatService, a real
tiny model and a real SQLite file."""
from __future__ import annotations

import logging

import pytest

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.config import parse_config

pytestmark = pytest.mark.timeout(120)


def make_config(tmp_path, model, **sections):
    raw = {"model": {"path": str(model)}, "storage": {"path": str(tmp_path / "mynah.sqlite3")},
           "generation": {"max_new_tokens": 4, "seed": 1}, "chat": {"stream": False}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


async def test_a_reply_to_a_message_forgotten_meanwhile_is_dropped_quietly(tmp_path, tiny_dialogpt, caplog):
    """Issue 25 #13: a handler died with FOREIGN KEY constraint failed storing a reply whose
    message /forget had just deleted. Now: nothing stored, nothing sent, no traceback."""
    caplog.set_level(logging.INFO)
    async with await Mynah.open(make_config(tmp_path, tiny_dialogpt)) as app:
        chat = app.chat
        msg = Incoming(platform="telegram", chat_id="-5", user_id="7", text="hello there", chat_type="group",
                       message_id="11", mentions_bot=True)
        chat_id, stored, _ = await chat.log_user_message(msg, "hello there")
        reply = await chat.generate(msg, await chat.build_context(chat_id))
        await chat.user.command_forget([], msg)               # /forget lands while the engine writes
        assert await chat.log_reply(chat_id, stored, msg, reply) is None
        rows = await app.db.fetchall("SELECT role FROM messages")
    assert [tuple(r) for r in rows] == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "forgotten while its reply was written" in caplog.text
