"""Feedback signals: the storage rules, Telegram reactions and buttons end to end (real PTB
against the fake Bot API), and the implicit signals derived from the log."""
from __future__ import annotations

import time

import pytest

from storage.store import Store
from storage import open_database
from storage.feedback import Feedback, is_short_negative, summarize
from tests.test_telegram import bot, fake, make_bot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)


async def _reply_row(harness, chat_id: int):
    await harness.idle()
    rows = harness.rows("SELECT m.id, m.platform_message_id, m.model_version FROM messages m JOIN chats c "
                        "ON c.id = m.chat_id WHERE c.platform_chat_id = ? AND m.role = 'bot' ORDER BY m.id DESC",
                        (str(chat_id),))
    return rows[0]


async def _deliver(harness, fake, update):
    await fake.wait_served(update)
    await harness.idle()


def _feedback(harness):
    return harness.rows("SELECT f.message_id, f.signal, f.value, f.kind, m.model_version, u.platform_user_id "
                        "FROM feedback f JOIN messages m ON m.id = f.message_id JOIN users u ON u.id = f.user_id "
                        "ORDER BY f.id")


async def test_telegram_reaction_is_stored_against_the_reply_and_its_version(bot, fake):
    fake.message(100, "hello there")
    await fake.wait_sent(100)
    reply_id, platform_id, version = await _reply_row(bot, 100)
    assert version  # every reply names the model version that wrote it
    await _deliver(bot, fake, fake.reaction(100, int(platform_id), ["👍"]))
    assert _feedback(bot) == [(reply_id, "reaction:👍", 1, "explicit", version, "100")]
    # Telegram reports the new complete set: 👍 replaced by 👎 and a neutral 👀
    await _deliver(bot, fake, fake.reaction(100, int(platform_id), ["👎", "👀"], old=["👍"]))
    assert sorted(r[1:3] for r in _feedback(bot)) == [("reaction:👀", 0), ("reaction:👎", -1)]
    await _deliver(bot, fake, fake.reaction(100, int(platform_id), [], old=["👎", "👀"]))   # all taken back
    assert _feedback(bot) == []


async def test_telegram_reaction_on_a_user_message_or_in_an_opted_out_chat_is_not_stored(bot, fake):
    own = fake.message(300, "hello there")
    await fake.wait_sent(300)
    await _deliver(bot, fake, fake.reaction(300, own["message"]["message_id"], ["👍"]))   # not a bot reply
    fake.message(300, "/optout")
    await fake.wait_sent(300, 2)
    fake.message(300, "are you there ?")
    await fake.wait_sent(300, 3)
    _, platform_id, _ = await _reply_row(bot, 300)
    await _deliver(bot, fake, fake.reaction(300, int(platform_id), ["👎"]))
    assert _feedback(bot) == []
    assert not bot.adapter.errors


async def test_telegram_buttons_under_replies_record_presses(make_bot, fake):
    harness = await make_bot(feedback={"buttons": True})
    fake.message(400, "hello there")
    sent = await fake.wait_sent(400)
    markup = sent[0].params["reply_markup"]
    assert [b["callback_data"] for b in markup["inline_keyboard"][0]] == ["fb:+", "fb:-"]
    reply_id, platform_id, version = await _reply_row(harness, 400)
    await _deliver(harness, fake, fake.button_press(400, int(platform_id), "fb:-"))
    assert _feedback(harness) == [(reply_id, "button", -1, "explicit", version, "400")]
    assert fake.calls_to("answerCallbackQuery")
    fake.message(400, "/help")           # a command's answer is no generated reply: no buttons
    later = await fake.wait_sent(400, 2)
    assert "reply_markup" not in later[1].params


async def test_reactions_off_by_config_store_nothing(make_bot, fake):
    harness = await make_bot(feedback={"enabled": False})
    fake.message(500, "hello there")
    await fake.wait_sent(500)
    _, platform_id, _ = await _reply_row(harness, 500)
    await _deliver(harness, fake, fake.reaction(500, int(platform_id), ["👍"]))
    assert _feedback(harness) == []


# ---- storage and implicit signals ---------------------------------------------------------

async def _setup(storage_target):
    """Each storage test below runs on SQLite and on PostgreSQL (conftest's storage_target)."""
    db = await open_database(storage_target)
    return db, Store.over(db), Feedback(db)


async def _exchange(conv, chat, user, text, reply, *, version="v0001", platform_id=None):
    await conv.messages.log_message(chat, "user", text, user_id=user)
    mid = await conv.messages.log_message(chat, "bot", reply, model_version=version, status="pending")
    await conv.messages.set_status(mid, "ok", platform_message_id=platform_id or f"b{mid}")
    return mid


async def test_implicit_signals_continuation_reset_and_short_negative(storage_target):
    db, conv, fb = await _setup(storage_target)
    try:
        chat = await conv.chats.chat("tg", 1)
        ann = await conv.chats.user("tg", 1)
        a = await _exchange(conv, chat, ann, "hi", "hello")
        b = await _exchange(conv, chat, ann, "how are you", "banana")   # answered "what?"
        await conv.messages.log_message(chat, "user", "what?", user_id=ann)
        c = await conv.messages.log_message(chat, "bot", "sorry", model_version="v0001")
        await conv.messages.reset(chat)                                          # /reset right after c
        other = await conv.chats.chat("tg", 2)
        d = await _exchange(conv, other, await conv.chats.user("tg", 2), "hey", "ho")   # nobody answered
        assert await fb.derive_implicit(300, now=time.time() - 10) == 0           # windows not over yet
        assert await fb.derive_implicit(300, now=time.time() + 301) == 4
        assert await fb.derive_implicit(300, now=time.time() + 301) == 0          # idempotent
        by_id = {s.message_id: s for s in await fb.scores()}
        assert (by_id[a].continued, by_id[a].outcome) == (1, 1)
        assert (by_id[b].implicit_negative, by_id[b].outcome) == (True, -1)
        assert (by_id[c].continued, by_id[c].outcome) == (0, -1)                  # the reset
        assert (by_id[d].continued, by_id[d].outcome) == (0, 0)
        table = summarize(list(by_id.values()))["v0001"]
        assert (table.replies, table.evaluated, table.positive, table.negative, table.continued) == (4, 4, 1, 2, 2)
    finally:
        await db.close()


async def test_explicit_feedback_decides_and_forget_removes_the_users_rows(storage_target):
    db, conv, fb = await _setup(storage_target)
    try:
        chat = await conv.chats.chat("tg", 1, type="group")
        ann, bob = await conv.chats.user("tg", 1), await conv.chats.user("tg", 2)
        mid = await _exchange(conv, chat, ann, "hi", "hello", platform_id="77")
        assert await fb.set_signals("tg", 1, "77", 2, {"reaction:👎": -1}) == 1          # bob reacts
        assert await fb.set_signals("tg", 1, "78", 2, {"reaction:👎": -1}) == 0          # no such reply
        with pytest.raises(ValueError):
            await fb.set_signals("tg", 1, "77", 2, {"x": 5})
        await fb.derive_implicit(1, now=time.time() + 10)
        score = (await fb.scores())[0]
        assert (score.message_id, score.outcome, score.explicit_count) == (mid, -1, 1)   # explicit beats silence
        await conv.messages.forget_user("tg", 2)
        assert [r[0] for r in await db.fetchall("SELECT user_id FROM feedback")] == [ann]  # only the implicit row
        assert bob
    finally:
        await db.close()


async def test_a_user_who_opted_out_leaves_no_feedback_anywhere(storage_target):
    from storage.trust import TrustStore

    db, conv, fb = await _setup(storage_target)
    try:
        chat = await conv.chats.chat("tg", 1, type="group")
        await _exchange(conv, chat, await conv.chats.user("tg", 1), "hi", "hello", platform_id="77")
        await TrustStore(db).set_user_consent("tg", "2", False)         # bob's own /optout, in any chat
        assert await fb.set_signals("tg", 1, "77", 2, {"reaction:👍": 1}) == 0
        assert await fb.set_signals("tg", 1, "77", 3, {"reaction:👍": 1}) == 1        # carol has not opted out
        assert [r[0] for r in await db.fetchall("SELECT u.platform_user_id FROM feedback f JOIN users u "
                                                "ON u.id = f.user_id")] == ["3"]
    finally:
        await db.close()


@pytest.mark.parametrize("text,negative", [("what?", True), ("??", True), ("That makes no sense.", True),
                                           ("what do you like to do ?", False), ("ok", False), ("", False)])
def test_short_negative_answers(text, negative):
    assert is_short_negative(text) is negative


def test_mynah_feedback_prints_the_per_version_table(tmp_path, capsys, storage_target):
    import asyncio
    import json as jsonlib

    from scripts.cli import main

    async def fill():
        db, conv, fb = await _setup(storage_target)
        try:
            for i in range(4):
                chat, user = await conv.chats.chat("tg", i), await conv.chats.user("tg", i)
                for version, emoji_value in (("v0001", 1 if i < 3 else -1), ("v0002", -1)):
                    await _exchange(conv, chat, user, "hi", f"reply {version}", version=version,
                                    platform_id=f"{version}-{i}")
                    await fb.set_signals("tg", i, f"{version}-{i}", i, {"reaction:x": emoji_value})
        finally:
            await db.close()

    asyncio.run(fill())
    config = tmp_path / "config.toml"
    key = "url" if storage_target.startswith("postgresql:") else "path"
    config.write_text(f'[storage]\n{key} = "{storage_target}"\n', encoding="utf-8")
    assert main(["--config", str(config), "feedback"]) == 0
    text = capsys.readouterr().out
    assert "positive (95% CI)" in text and "v0001" in text and "v0002" in text
    assert main(["--config", str(config), "feedback", "--json"]) == 0
    rows = {r["version"]: r for r in jsonlib.loads(capsys.readouterr().out)}
    assert (rows["v0001"]["replies"], rows["v0001"]["positive"], rows["v0001"]["negative"]) == (4, 3, 1)
    assert (rows["v0002"]["positive"], rows["v0002"]["negative"]) == (0, 4)
    assert " 75% [" in text.splitlines()[1]
    v1 = rows["v0001"]    # numbers, not formatted strings
    assert v1["positive_rate"] == 0.75 and v1["negative_rate"] == 0.25 and rows["v0002"]["positive_rate"] == 0.0
    assert all(isinstance(x, float) for x in v1["positive_ci"]) and v1["positive_ci"][0] < 0.75 < v1["positive_ci"][1]
    assert v1["continuation_rate"] is None or isinstance(v1["continuation_rate"], float)
    assert rows["v0001"]["mean_conversation_length"] == 4.0    # each chat: 2 exchanges = 4 messages
    missing = tmp_path / "none.toml"
    missing.write_text(f'[storage]\npath = "{tmp_path / "absent.sqlite3"}"\n', encoding="utf-8")
    assert main(["--config", str(missing), "feedback"]) == 1
    capsys.readouterr()
    for bad in ("-1", "nan", "soon"):    # argparse refuses it: exit 2 and why
        with pytest.raises(SystemExit) as refused:
            main(["--config", str(config), "feedback", "--hours", bad])
        assert refused.value.code == 2 and "--hours" in capsys.readouterr().err


@pytest.mark.parametrize("raw,message", [
    ({"feedback": {"positive": ["👍"], "negative": ["👍️"]}}, "both positive and negative"),
    ({"feedback": {"implicit_window_minutes": 0}}, "implicit_window_minutes must be greater than 0"),
    ({"feedback": {"negative": [""]}}, "non-empty strings"),
    ({"learning": {"canary_share": 1.0}}, "canary_share"),
    ({"learning": {"canary_min_replies": 0}}, "canary_min_replies must be greater than 0"),
    ({"learning": {"feedback_weighting": "boost"}}, "feedback_weighting must be one of drop, off, weight"),
])
def test_feedback_and_canary_config_is_checked(raw, message):
    from bots.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(raw)
