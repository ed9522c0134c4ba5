"""A streamed reply asks the engine while its pending row is stored, and shows nothing before the row is there
(bots/chat/streaming.py ShownAfter): the real chat path, SQLite and a tiny engine."""
from __future__ import annotations

import asyncio

import pytest

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.chat.streaming import StreamedMessage
from bots.config import parse_config

pytestmark = pytest.mark.timeout(120)


class Shown(StreamedMessage):
    def __init__(self, events):
        super().__init__(4096, interval_s=0.0)
        self.events = events

    async def send_first(self, text):
        self.events.append("shown")
        return "m1"

    async def edit(self, message, text):
        self.events.append("shown")


async def _open(tmp_path, tiny_dialogpt):
    config = parse_config({"model": {"path": str(tiny_dialogpt)}, "storage": {"path": str(tmp_path / "db.sqlite3")},
                           "generation": {"max_new_tokens": 8, "min_new_tokens": 8, "seed": 2},
                           "chat": {"stream": True}})
    return await Mynah.open(config)


async def test_the_engine_starts_while_the_pending_row_is_stored_and_nothing_shows_before_it(tmp_path, tiny_dialogpt):
    app = await _open(tmp_path, tiny_dialogpt)
    events: list[str] = []
    chat, engine = app.chat, app.chat.engine
    real_hold, real_stream = chat.hold_reply, engine.stream

    async def slow_hold(*args, **kwargs):
        await asyncio.sleep(0.5)  # a slow commit (a busy disk, a burst's other writes)
        held = await real_hold(*args, **kwargs)
        events.append("stored")
        return held

    def stream(*args, **kwargs):
        events.append("engine asked")
        return real_stream(*args, **kwargs)

    chat.hold_reply, engine.stream = slow_hold, stream
    try:
        (out,) = await chat.handle(Incoming("telegram", "c1", "u1", "hello there", message_id="m1"), stream=Shown(events))
        row = await app.db.fetchone("SELECT status, text FROM messages WHERE id = ?", (out.stored_id,))
    finally:
        await app.close()
    assert events[0] == "engine asked"                  # not after the 0.5 s write
    assert "shown" in events and events.index("stored") < events.index("shown")  # the row is there before any words
    assert row[0] == "pending" and row[1] == out.text   # the held row became the whole reply


async def test_a_message_forgotten_while_its_reply_is_written_shows_and_sends_nothing(tmp_path, tiny_dialogpt):
    app = await _open(tmp_path, tiny_dialogpt)
    events: list[str] = []

    async def forgotten(*args, **kwargs):
        return None  # hold_reply's answer when the message it answers is gone (/forget)

    app.chat.hold_reply = forgotten
    try:
        out = await app.chat.handle(Incoming("telegram", "c1", "u1", "hello there", message_id="m1"), stream=Shown(events))
    finally:
        await app.close()
    assert out == [] and events == []
