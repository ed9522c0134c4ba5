"""Streamed replies on Telegram: drafts in private chats, edits in groups, edits again when a draft fails.

A real Mynah app and the real PTB adapter against the fake Bot API (tests/fakes/telegram_api.py,
which implements sendMessageDraft), the tiny local engine streaming 12 tokens.
"""
from __future__ import annotations

import sqlite3

import pytest

from tests.fakes.telegram_api import BOT_USERNAME, TOKEN, FakeTelegram

pytestmark = pytest.mark.timeout(90)
INTERVAL = 0.2


async def _run(tmp_path, model, send):
    """Start the app and adapter, let `send(fake)` queue messages, wait until all are answered."""
    from bots.app import Mynah
    from bots.config import parse_config
    from bots.platforms.telegram.adapter import TelegramAdapter

    fake = await FakeTelegram().start()
    config = parse_config({"model": {"path": str(model)}, "storage": {"path": str(tmp_path / "db.sqlite3")},
                           "generation": {"max_new_tokens": 12, "min_new_tokens": 12, "seed": 2},
                           "chat": {"stream": True, "stream_edit_seconds": INTERVAL},
                           "telegram": {"base_url": fake.base_url}})
    app = await Mynah.open(config)
    adapter = TelegramAdapter(app, TOKEN, poll_timeout=2, retry_delay=0.05)
    await adapter.start()
    try:
        update = send(fake)
        await fake.wait_served(update)
        await adapter.wait_idle(30)
    finally:
        await adapter.stop()
        await app.close()
        await fake.close()
    with sqlite3.connect(config.storage.path) as db:
        stored = db.execute("SELECT text, status, platform_message_id FROM messages WHERE role = 'bot'").fetchall()
    return fake, stored


async def test_a_private_reply_shows_drafts_first_then_one_final_message(tmp_path, tiny_dialogpt):
    fake, stored = await _run(tmp_path, tiny_dialogpt, lambda fake: fake.message(701, "hello there"))
    [(text, status, message_id)] = stored
    drafts, [final] = fake.calls_to("sendMessageDraft", 701), fake.sent(701)
    assert drafts and all(d.at <= final.at for d in drafts)                 # words on screen before the message
    assert all(text.startswith(d.params["text"].strip()) for d in drafts)  # each draft is the reply so far
    assert len({d.params["draft_id"] for d in drafts}) == 1 and int(drafts[0].params["draft_id"]) != 0
    assert final.params["text"] == text and status == "ok" and message_id == str(final.result["message_id"])
    assert fake.edits(701) == []                                           # no edit waited out the interval


async def test_a_group_reply_is_one_message_edited_at_most_once_per_interval(tmp_path, tiny_dialogpt):
    fake, stored = await _run(tmp_path, tiny_dialogpt,
                              lambda fake: fake.message(-702, f"@{BOT_USERNAME} hello there", chat_type="group",
                                                        user_id=55))
    [(text, status, _)] = stored
    assert fake.calls_to("sendMessageDraft") == []
    assert len(fake.sent(-702)) == 1 and fake.edits(-702)
    times = [fake.sent(-702)[0].at] + [e.at for e in fake.edits(-702)]
    assert all(b - a >= INTERVAL * 0.9 for a, b in zip(times, times[1:]))
    assert fake.shown(-702) == [text] and status == "ok"


async def test_a_draft_that_fails_falls_back_to_a_message_and_edits(tmp_path, tiny_dialogpt):
    def send(fake):
        fake.fail_next("sendMessageDraft", 400)
        return fake.message(703, "hello there")

    fake, stored = await _run(tmp_path, tiny_dialogpt, send)
    [(text, status, message_id)] = stored
    assert fake.calls_to("sendMessageDraft", 703) == [] and len(fake.calls_to("sendMessageDraft", 703, ok_only=False)) == 1
    [first] = fake.sent(703)
    assert first.params["text"] != text and text.startswith(first.params["text"].strip())  # the first words, early
    assert fake.edits(703) and fake.shown(703) == [text] and status == "ok"
    assert message_id == str(first.result["message_id"])
