"""Telegram end to end: the real python-telegram-bot Application, the real engine with a
tiny model and a real SQLite file, against the fake Bot API server in fake_telegram.py
(aiohttp on 127.0.0.1, reached through `[telegram] base_url`). Nothing here talks to
api.telegram.org.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bots.app import Mynah
from bots.chat.service import NON_TEXT_TEXT
from bots.config import ConfigError, parse_config
from bots.chat.events import Outgoing, PlatformStartError
from bots.runner import serve
from bots.chat.splitting import split_message
from bots.platforms.telegram.adapter import TelegramAdapter, api_urls
from tests.fakes.telegram_api import BOT_ID, BOT_USERNAME, TOKEN, FakeTelegram

ROOT = Path(__file__).resolve().parents[1]
ADMIN = 4242
SECRET_HALF = TOKEN.split(":", 1)[1]

pytestmark = pytest.mark.timeout(60)


def make_config(tmp_path: Path, model: Path, fake: FakeTelegram, **sections):
    raw = {
        "model": {"path": str(model)},
        "storage": {"path": str(tmp_path / "mynah.sqlite3")},
        "generation": {"max_new_tokens": 4, "seed": 1},
        "admins": {"telegram": [ADMIN]},
        "telegram": {"base_url": fake.base_url},
        "chat": {"stream": False},   # streaming has its own tests (test_openai_backend.py, test_streaming.py)
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


class Harness:
    """A running Mynah + TelegramAdapter; `engine_calls` records what the real engine got."""

    def __init__(self, config, fake: FakeTelegram, token: str = TOKEN):
        self.config, self.fake, self.token = config, fake, token
        self.engine_calls: list[list[tuple[str, str]]] = []
        self.in_flight = self.max_in_flight = 0    # engine requests running at the same time
        self.app: Mynah | None = None
        self.adapter: TelegramAdapter | None = None

    async def start(self) -> "Harness":
        self.app = await Mynah.open(self.config)
        real = self.app.engine.reply

        async def recording_reply(turns, overrides=None, **kwargs):  # a spy: the real engine answers
            self.engine_calls.append([tuple(t) for t in turns])
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await real(turns, overrides, **kwargs)
            finally:
                self.in_flight -= 1

        self.app.engine.reply = recording_reply
        self.adapter = TelegramAdapter(self.app, self.token, poll_timeout=2, retry_delay=0.05)
        await self.adapter.start()
        return self

    async def stop(self) -> None:
        if self.adapter is not None:
            await self.adapter.stop()
            self.adapter = None
        if self.app is not None:
            await self.app.close()
            self.app = None

    async def idle(self) -> None:
        await self.adapter.wait_idle(15)

    def rows(self, sql: str, params=()) -> list[tuple]:
        db = sqlite3.connect(self.config.storage.path)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def messages(self, chat_id: int, thread: str = "") -> list[tuple]:
        """(role, text, platform_message_id, reply_to_platform_id, status) of a chat, in order."""
        return self.rows(
            "SELECT m.role, m.text, m.platform_message_id, m.reply_to_platform_id, m.status "
            "FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.platform = 'telegram' AND c.platform_chat_id = ? AND c.thread_id = ? ORDER BY m.id",
            (str(chat_id), thread))


@pytest.fixture
async def fake():
    server = await FakeTelegram().start()
    yield server
    await server.close()


@pytest.fixture
async def make_bot(tmp_path, tiny_dialogpt, fake):
    started: list[Harness] = []

    async def make(**sections) -> Harness:
        harness = await Harness(make_config(tmp_path, tiny_dialogpt, fake, **sections), fake).start()
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.stop()


@pytest.fixture
async def bot(make_bot) -> Harness:
    return await make_bot()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- private chats ------------------------------------------------------------------------

async def test_private_chat_remembers_and_stores_telegram_ids(bot, fake):
    first = fake.message(100, "hello there", first_name="Ann")
    await fake.wait_sent(100, 1)
    second = fake.message(100, "what do you like to do ?")
    sent = await fake.wait_sent(100, 2)
    await bot.idle()

    rows = bot.messages(100)
    assert [r[0] for r in rows] == ["user", "bot", "user", "bot"]
    first_id, second_id = str(first["message"]["message_id"]), str(second["message"]["message_id"])
    # user messages carry Telegram's message ids; replies carry the id Telegram gave them
    assert rows[0][:3] == ("user", "hello there", first_id)
    assert rows[2][:3] == ("user", "what do you like to do ?", second_id)
    assert rows[1][2] == str(sent[0].result["message_id"]) and rows[1][3] == first_id and rows[1][4] == "ok"
    assert rows[3][2] == str(sent[1].result["message_id"]) and rows[3][3] == second_id and rows[3][4] == "ok"
    assert sent[0].params["text"] == split_message(rows[1][1], 4096)[0]
    # the engine got the first turn (and its reply) as context for the second
    assert bot.engine_calls[0] == [("user", "hello there")]
    assert bot.engine_calls[1] == [("user", "hello there"), ("bot", rows[1][1]), ("user", "what do you like to do ?")]
    # users are stored under their Telegram id; private replies do not quote
    assert bot.rows("SELECT platform_user_id, name FROM users WHERE platform = 'telegram'") == [("100", "Ann")]
    assert all("reply_parameters" not in c.params for c in sent)
    # "typing…" was shown while generating
    typing = fake.calls_to("sendChatAction", 100)
    assert typing and all(c.params["action"] == "typing" for c in typing)


async def test_commands_are_registered_for_everyone_and_admins(bot, fake):
    calls = fake.calls_to("setMyCommands")
    default = [c for c in calls if "scope" not in c.params]
    admin = [c for c in calls if c.params.get("scope", {}).get("chat_id") == ADMIN]
    assert len(default) == 1 and len(admin) == 1
    names = [c["command"] for c in default[0].params["commands"]]
    assert names == ["start", "help", "reset", "forget", "optout", "optin", "persona", "memory"]
    admin_names = {c["command"] for c in admin[0].params["commands"]}
    assert {"retrain", "status", "rollback", "models"} <= admin_names and set(names) <= admin_names
    # long polling without dropping what was sent while the bot was down
    assert fake.calls_to("deleteWebhook")[0].params.get("drop_pending_updates") in (None, "False", "false", False)


async def test_reset_and_forget(bot, fake):
    fake.message(101, "hello there")
    await fake.wait_sent(101, 1)
    fake.message(101, "/reset")
    texts = await fake.wait_sent(101, 2)
    assert "Fresh start" in texts[1].params["text"]
    fake.message(101, "good morning")
    await fake.wait_sent(101, 3)
    assert bot.engine_calls[-1] == [("user", "good morning")]  # nothing from before /reset

    fake.message(101, "/forget")
    sent = await fake.wait_sent(101, 4)
    assert "deleted 2" in sent[3].params["text"]
    await bot.idle()
    left = bot.rows("SELECT COUNT(*) FROM messages m JOIN users u ON u.id = m.user_id "
                    "WHERE u.platform = 'telegram' AND u.platform_user_id = '101'")
    assert left == [(0,)]
    assert [r[0] for r in bot.messages(101)] == []  # the bot's replies to them went too


STICKER = {"file_id": "s1", "file_unique_id": "s1", "type": "regular", "width": 512, "height": 512,
           "is_animated": False, "is_video": False}


async def test_a_sticker_flood_counts_toward_the_rate_limit_with_one_notice(make_bot, fake):
    """Issue 25 #4: 40 stickers got 40 notes. Every kind of message counts; one notice per window."""
    bot = await make_bot(chat={"rate_limit_messages": 3, "rate_limit_seconds": 60})
    updates = [fake.message(103, sticker=STICKER) for _ in range(40)]
    for update in updates:
        await fake.wait_served(update)
    await bot.idle()
    texts = fake.texts(103)
    assert texts[:3] == [NON_TEXT_TEXT] * 3
    assert len(texts) == 4 and "faster than I can think" in texts[3]


async def test_sticker_and_voice_get_a_note_empty_text_and_edits_are_ignored(bot, fake):
    fake.message(102, sticker={"file_id": "s1", "file_unique_id": "s1", "type": "regular", "width": 512,
                               "height": 512, "is_animated": False, "is_video": False})
    await fake.wait_sent(102, 1)
    fake.message(102, voice={"file_id": "v1", "file_unique_id": "v1", "duration": 2})
    sent = await fake.wait_sent(102, 2)
    assert [c.params["text"] for c in sent] == [NON_TEXT_TEXT, NON_TEXT_TEXT]

    blank = fake.message(102, "   ")
    edited = fake.message(102, "hello there (edited)", edited=True)
    await fake.wait_served(edited)
    await bot.idle()
    assert blank["update_id"] in fake.served
    assert len(fake.sent(102)) == 2           # no reply to blank text or to an edit
    assert bot.engine_calls == []             # and no generation either
    assert fake.calls_to("sendChatAction", 102) == []

    fake.message(102, "hello there")          # still alive and answering
    await fake.wait_sent(102, 3)
    assert list(bot.adapter.errors) == []


async def test_typing_is_resent_while_generating_and_stops_after(make_bot, fake, monkeypatch):
    monkeypatch.setattr("bots.platforms.telegram.sender.TYPING_EVERY_S", 0.05)    # Telegram's is 4 s
    bot = await make_bot(generation={"max_new_tokens": 24, "min_new_tokens": 24}, engine={"fast_path": "off"})
    # the tiny model answers in milliseconds; make each decode step take 20 ms so the
    # reply takes ~0.5 s, long enough for several typing resends however fast the machine is
    # (a hook on transformers' forward: the GPT-2 fast path would bypass it, hence fast_path off)
    bot.app.engine.model.model.register_forward_hook(lambda *_: time.sleep(0.02))
    fake.message(104, "hello there")
    sent = await fake.wait_sent(104, 1)
    await bot.idle()
    await asyncio.sleep(0.3)
    typing = fake.calls_to("sendChatAction", 104)
    assert len(typing) >= 3
    assert all(c.at <= sent[0].at + 0.1 for c in typing)     # no more "typing…" once it has answered


async def test_rate_limit_has_a_clear_message(make_bot, fake):
    bot = await make_bot(chat={"rate_limit_messages": 2})
    for i, text in enumerate(["hello there", "good morning", "good night"], start=1):
        fake.message(103, text)
        await fake.wait_sent(103, i)
    assert "faster than I can think" in fake.texts(103)[2]
    assert len(bot.engine_calls) == 2


# ---- groups ---------------------------------------------------------------------------------

async def test_group_consent_is_for_the_groups_admins(bot, fake):
    """getChatMember decides: an administrator's /optout sticks, a member's /optin is refused."""
    group = -1002
    fake.chat_admins[group].add(11)
    fake.message(group, "/optout", chat_type="supergroup", user_id=11)
    await fake.wait_sent(group, 1)
    assert "no longer be used" in fake.texts(group)[0]
    fake.message(group, "/optin", chat_type="supergroup", user_id=12)
    await fake.wait_sent(group, 2)
    assert "for its admins" in fake.texts(group)[1]
    assert bot.rows("SELECT consent FROM chats WHERE platform_chat_id = ?", (str(group),)) == [(0,)]
    asked = [(c.params["chat_id"], c.params["user_id"]) for c in fake.calls_to("getChatMember")]
    assert [(int(a), int(b)) for a, b in asked] == [(group, 11), (group, 12)]
    assert bot.rows("SELECT platform_user_id, command, allowed FROM admin_audit ORDER BY id") == [
        ("11", "optout", 1), ("12", "optin", 0)]


async def test_group_answers_mentions_replies_and_commands_only(bot, fake):
    group = -1001
    chatter = fake.message(group, "just chatting among ourselves", chat_type="supergroup", user_id=7)
    mention = fake.message(group, f"@{BOT_USERNAME} hello there", chat_type="supergroup", user_id=7)
    sent = await fake.wait_sent(group, 1)
    await bot.idle()
    assert sent[0].params["reply_parameters"]["message_id"] == mention["message"]["message_id"]
    assert bot.engine_calls == [[("user", "hello there")]]          # the @mention is not part of the text
    assert chatter["update_id"] in fake.served
    assert all(r[1] != "just chatting among ourselves" for r in bot.messages(group))

    # a reply to the bot's message is answered; a reply to someone else is not
    fake.message(group, "and you ?", chat_type="supergroup", user_id=8, reply_to=sent[0].result)
    await fake.wait_sent(group, 2)
    other = {"message_id": chatter["message"]["message_id"], "date": 0, "chat": chatter["message"]["chat"],
             "from": chatter["message"]["from"], "text": "just chatting among ourselves"}
    fake.message(group, "i agree", chat_type="supergroup", user_id=8, reply_to=other)
    # commands: ours are answered, /cmd@otherbot is left alone
    fake.message(group, "/help@other_bot", chat_type="supergroup", user_id=8)
    fake.message(group, "/nonsense", chat_type="supergroup", user_id=8)
    last = fake.message(group, f"/help@{BOT_USERNAME}", chat_type="supergroup", user_id=8)
    await fake.wait_served(last)
    await bot.idle()
    texts = fake.texts(group)
    assert len(texts) == 3 and "/reset" in texts[2]
    assert len(bot.engine_calls) == 2
    assert bot.engine_calls[1][-1] == ("user", "and you ?")
    assert len(fake.calls_to("sendChatAction", group)) == 2        # typing only where it generated
    assert bot.rows("SELECT type, title FROM chats WHERE platform_chat_id = ?", (str(group),)) == \
        [("group", f"group {group}")]


async def test_group_text_mention_of_the_bot_counts(bot, fake):
    """A mention by name (text_mention entity, for users without a @username) is a mention too."""
    entity = {"type": "text_mention", "offset": 0, "length": 5,
              "user": {"id": BOT_ID, "is_bot": True, "first_name": "Mynah"}}
    fake.message(-1004, "Mynah what is your name ?", chat_type="supergroup", user_id=7, entities=[entity])
    fake.message(-1004, "what is your name ?", chat_type="supergroup", user_id=7, entities=[])
    await fake.wait_sent(-1004, 1)
    await bot.idle()
    assert len(fake.sent(-1004)) == 1 and bot.engine_calls == [[("user", "Mynah what is your name ?")]]


async def test_group_ignores_other_bots_but_not_anonymous_admins(bot, fake):
    group = -1005
    other_bot = fake.message(group, f"@{BOT_USERNAME} hello there", chat_type="supergroup", user_id=55)
    other_bot["message"]["from"]["is_bot"] = True
    anonymous = fake.message(group, f"@{BOT_USERNAME} good morning", chat_type="supergroup", user_id=1087968824,
                             first_name="Group", sender_chat={"id": group, "type": "supergroup", "title": "admins"})
    anonymous["message"]["from"]["is_bot"] = True
    await fake.wait_sent(group, 1)
    await bot.idle()
    assert len(fake.sent(group)) == 1 and bot.engine_calls == [[("user", "good morning")]]
    assert bot.rows("SELECT platform_user_id, name FROM users") == [(str(group), "admins")]


async def test_forum_topics_keep_their_own_context(bot, fake):
    forum = -1002
    fake.message(forum, f"@{BOT_USERNAME} hello there", chat_type="supergroup", thread_id=5, user_id=7)
    sent = await fake.wait_sent(forum, 1)
    assert sent[0].params["message_thread_id"] == "5"
    fake.message(forum, f"@{BOT_USERNAME} good morning", chat_type="supergroup", thread_id=9, user_id=7)
    sent = await fake.wait_sent(forum, 2)
    assert sent[1].params["message_thread_id"] == "9"
    fake.message(forum, f"@{BOT_USERNAME} good night", chat_type="supergroup", thread_id=5, user_id=7)
    await fake.wait_sent(forum, 3)
    await bot.idle()

    assert bot.engine_calls[1] == [("user", "good morning")]         # topic 9 knows nothing of topic 5
    assert [t for t in bot.engine_calls[2] if t[0] == "user"] == [("user", "hello there"), ("user", "good night")]
    topic5 = bot.messages(forum, "5")
    assert [r[0] for r in topic5] == ["user", "bot", "user", "bot"]
    assert topic5[0][3] is None        # the topic's root message is not a "reply"
    assert len(bot.messages(forum, "9")) == 2 and bot.messages(forum) == []


async def test_answer_all_switch_per_chat_type(make_bot, fake):
    bot = await make_bot(telegram={"answer_all_chat_types": ["group"]})
    fake.message(-3001, "hello there", chat_type="group", user_id=7)
    fake.message(-1003001, "hello there", chat_type="supergroup", user_id=7)
    await fake.wait_sent(-3001, 1)
    await bot.idle()
    assert fake.sent(-1003001) == []
    with pytest.raises(ConfigError):
        parse_config({"telegram": {"answer_all_chat_types": ["channel"]}})


# ---- admin --------------------------------------------------------------------------------

async def test_admin_commands_refused_for_others_and_audited(bot, fake):
    fake.message(200, "/status", user_id=200)
    fake.message(201, "/retrain", user_id=201)
    fake.message(ADMIN, "/status", user_id=ADMIN)
    await fake.wait_sent(200, 1)
    await fake.wait_sent(201, 1)
    await fake.wait_sent(ADMIN, 1)
    await bot.idle()
    assert "admins only" in fake.texts(200)[0]
    assert "admins only" in fake.texts(201)[0]
    assert "Model version" in fake.texts(ADMIN)[0]
    audit = sorted(bot.rows("SELECT platform, platform_user_id, command, allowed FROM admin_audit"))
    assert audit == [("telegram", "200", "status", 0), ("telegram", "201", "retrain", 0),
                     ("telegram", str(ADMIN), "status", 1)]


# ---- sending ------------------------------------------------------------------------------

async def test_ten_thousand_characters_are_split_through_the_real_bot(bot, fake):
    fake.message(300, "/start")                     # the fake learns the chat
    await fake.wait_sent(300, 1)
    paragraph = ("Mynah likes long stories. " * 60).strip()        # ~1,600 characters
    text = "\n\n".join([paragraph] * 6)
    text += "\n\n" + "x" * (10_000 - len(text) - 2)
    assert len(text) == 10_000
    conv = bot.app.store
    chat_id = await conv.chats.chat("telegram", "300")
    stored = await conv.messages.log_message(chat_id, "bot", text, status="pending")

    ids = await bot.adapter.send(300, Outgoing(text, stored_id=stored), reply_to=7)
    parts = fake.sent(300)[1:]
    assert len(parts) == len(ids) >= 3
    assert all(len(c.params["text"]) <= 4096 for c in parts)
    assert "\n\n".join(c.params["text"] for c in parts) == text          # split on paragraph boundaries
    assert parts[0].params["reply_parameters"]["message_id"] == 7         # only the first part quotes
    assert all("reply_parameters" not in c.params for c in parts[1:])
    assert bot.rows("SELECT status, platform_message_id FROM messages WHERE id = ?", (stored,)) == \
        [("ok", str(ids[0]))]


async def test_a_partly_sent_reply_is_marked_failed_with_its_first_part(bot, fake):
    """The one rule for partial sends (bots/chat/delivery.py): delivered only when every part
    went out; a partly sent reply is failed (not context, not training data, not resent),
    with the first part's id kept so a reply to it still counts as a reply to the bot."""
    fake.message(303, "/start")
    await fake.wait_sent(303, 1)
    text = "first part. " * 400 + "\n\n" + "second part. " * 400         # two parts of under 4096
    store = bot.app.store
    stored = await store.messages.log_message(await store.chats.chat("telegram", "303"), "bot", text, status="pending")
    fake.fail_next("sendMessage", 403, after=1)                         # the first part goes out, then 403
    ids = await bot.adapter.send(303, Outgoing(text, stored_id=stored))
    assert len(ids) == 1 and len(fake.sent(303)) == 2
    assert bot.rows("SELECT status, platform_message_id FROM messages WHERE id = ?", (stored,)) == \
        [("failed", str(ids[0]))]


async def test_a_picture_with_its_caption(bot, fake, tmp_path):
    """Retrain results come as text + loss-curve picture through notify()."""
    picture = tmp_path / "loss.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    await bot.adapter.notify("301", Outgoing("candidate promoted: loss 4.1 -> 3.9", image=picture))
    photos = fake.calls_to("sendPhoto", 301)
    assert len(photos) == 1 and photos[0].params["caption"] == "candidate promoted: loss 4.1 -> 3.9"
    assert photos[0].params["photo"].startswith(b"\x89PNG") and fake.sent(301) == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # PTB's own RetryAfter warns about its int field
async def test_429_delays_the_reply_and_never_drops_it(bot, fake):
    fake.fail_next("sendMessage", 429, retry_after=1)
    fake.message(301, "hello there")
    await fake.wait_sent(301, 1, timeout=20)
    attempts = fake.calls_to("sendMessage", 301, ok_only=False)
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 1.0
    assert attempts[0].params["text"] == attempts[1].params["text"]
    await bot.idle()
    assert [r[4] for r in bot.messages(301)] == ["ok", "ok"]


async def test_network_errors_are_retried_and_a_final_failure_is_recorded(bot, fake):
    fake.fail_next("sendMessage", 502, times=2)
    fake.message(302, "hello there")
    await fake.wait_sent(302, 1)
    assert [c.status for c in fake.calls_to("sendMessage", 302, ok_only=False)] == [502, 502, 200]

    fake.fail_next("sendMessage", 403)      # blocked by the user: no point retrying
    fake.message(302, "good morning")
    await fake.wait_for(lambda: len(fake.calls_to("sendMessage", 302, ok_only=False)) == 4)
    await bot.idle()
    rows = bot.messages(302)
    assert [(r[0], r[4]) for r in rows] == [("user", "ok"), ("bot", "ok"), ("user", "ok"), ("bot", "failed")]
    assert len(fake.sent(302)) == 1
    fake.message(302, "good night")         # the bot carries on, and the failed reply is not context
    await fake.wait_sent(302, 2)
    assert [role for role, _ in bot.engine_calls[-1]] == ["user", "bot", "user", "user"]


# ---- scale, durability, lifecycle --------------------------------------------------------------

async def test_twenty_chats_at_once_all_answered(bot, fake):
    chats = list(range(1000, 1020))
    for chat in chats:
        fake.message(chat, "hello there")
    await fake.wait_for(lambda: all(fake.sent(c) for c in chats), timeout=30)
    await bot.idle()
    assert all(len(fake.sent(c)) == 1 for c in chats)
    assert bot.rows("SELECT COUNT(*) FROM messages WHERE role = 'bot' AND status = 'ok'") == [(20,)]
    assert len(bot.engine_calls) == 20
    assert bot.max_in_flight > 1          # chats did not wait on each other: the engine batched them


async def test_messages_are_stored_before_telegram_forgets_them(bot, fake):
    """getUpdates with offset N acknowledges every update below N: each must be in SQLite by then."""
    checked, missing = [], []
    pushed: dict[int, dict] = {}

    def check(offset: int) -> None:
        for update_id, update in pushed.items():
            if update_id < offset and update_id not in checked:
                checked.append(update_id)
                found = bot.rows("SELECT 1 FROM messages WHERE platform_message_id = ? AND role = 'user'",
                                 (str(update["message"]["message_id"]),))
                if not found:
                    missing.append(update_id)

    fake.get_updates_hooks.append(check)
    for chat in range(1100, 1110):
        update = fake.message(chat, "hello there")
        pushed[update["update_id"]] = update
    await fake.wait_for(lambda: all(fake.sent(c) for c in range(1100, 1110)), timeout=30)
    await bot.idle()
    await bot.adapter.stop()      # the last acknowledgement happens on the way out
    bot.adapter = None
    assert sorted(checked) == sorted(pushed)
    assert missing == []


async def test_stop_finishes_the_reply_in_flight_and_fetches_no_more(bot, fake):
    fake.delay_next("sendMessage", 1.5)
    fake.message(400, "hello there")
    await fake.wait_for(lambda: fake.calls_to("sendChatAction", 400))      # generating now
    await bot.adapter.stop()
    bot.adapter = None
    assert len(fake.sent(400)) == 1                                      # it was sent before stop returned
    assert [r[4] for r in bot.messages(400)] == ["ok", "ok"]
    polls = len(fake.calls_to("getUpdates"))
    late = fake.message(401, "anyone there ?")
    await asyncio.sleep(0.3)
    assert len(fake.calls_to("getUpdates")) == polls and late["update_id"] not in fake.served


async def test_restart_keeps_the_context(make_bot, fake):
    bot = await make_bot()
    fake.message(500, "hello there")
    await fake.wait_sent(500, 1)
    await bot.stop()

    fake.message(500, "what is your name ?")     # sent while the bot is down: not dropped
    again = await make_bot()                      # a new process, in effect: same DB file
    await fake.wait_sent(500, 2)
    await again.idle()
    old = bot.messages(500)
    assert again.engine_calls == [[("user", "hello there"), ("bot", old[1][1]), ("user", "what is your name ?")]]
    assert [r[0] for r in again.messages(500)] == ["user", "bot", "user", "bot"]   # nothing handled twice


async def test_bad_token_is_a_clear_error_without_the_token(tmp_path, tiny_dialogpt, fake, caplog):
    bad = "999:WrongSecretThatMustNeverBeLogged"
    config = make_config(tmp_path, tiny_dialogpt, fake)
    async with await Mynah.open(config) as app:
        with pytest.raises(PlatformStartError) as info:
            await TelegramAdapter(app, bad).start()
    assert "rejected the bot token" in str(info.value)
    assert bad not in str(info.value) and "WrongSecret" not in str(info.value)
    assert fake.calls_to("getMe", ok_only=False)[-1].status == 401

    # and `mynah run` exits non-zero
    caplog.set_level(logging.INFO)
    assert await serve(config, environ={"TELEGRAM_BOT_TOKEN": bad}) == 1
    assert "rejected the bot token" in caplog.text and "WrongSecret" not in caplog.text


async def test_unreachable_server_is_a_clear_error(tmp_path, tiny_dialogpt, fake):
    config = make_config(tmp_path, tiny_dialogpt, fake, telegram={"base_url": f"http://127.0.0.1:{free_port()}"})
    async with await Mynah.open(config) as app:
        with pytest.raises(PlatformStartError) as info:
            await TelegramAdapter(app, TOKEN).start()
    assert "cannot reach the Telegram Bot API at http://127.0.0.1:" in str(info.value)
    assert SECRET_HALF not in str(info.value)


async def test_the_token_never_reaches_the_logs(tmp_path, tiny_dialogpt, fake, caplog):
    caplog.set_level(logging.DEBUG)
    harness = await Harness(make_config(tmp_path, tiny_dialogpt, fake), fake).start()
    try:
        fake.fail_next("sendMessage", 502)
        fake.message(600, "hello there")
        await fake.wait_sent(600, 1)
        await harness.idle()
        app_repr = repr(harness.adapter.application.bot)
        logging.getLogger("mynah.test").info("the bot is %s", app_repr)
    finally:
        await harness.stop()
    assert "Set Bot API URL" in caplog.text and "getUpdates" in caplog.text    # URLs were logged…
    assert TOKEN not in caplog.text and SECRET_HALF not in caplog.text          # …without the token


async def test_mynah_run_connects_the_learning_loop_to_telegram(tmp_path, tiny_dialogpt, fake, monkeypatch):
    """The composition root registers each started platform's notify with the learning loop
    (no adapter goes looking for it), so a run's result reaches the Telegram chat that asked."""
    opened = []
    real_open = Mynah.open.__func__

    async def recording_open(cls, config, **kwargs):
        opened.append(await real_open(cls, config, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Mynah, "open", classmethod(recording_open))
    config = make_config(tmp_path, tiny_dialogpt, fake,
                         learning={"enabled": True, "registry": str(tmp_path / "models")})
    stop = asyncio.Event()
    served = asyncio.create_task(serve(config, environ={"TELEGRAM_BOT_TOKEN": TOKEN}, stop_event=stop))
    try:
        fake.message(900, "hello there")        # answered: Telegram is up (and registered)
        await fake.wait_sent(900, 1, timeout=30)
        [app] = opened
        await app.learning.notify([("telegram", "900", "")], Outgoing("run #1: promoted"))
        assert fake.texts(900)[1:] == ["run #1: promoted"]
    finally:
        stop.set()
        assert await asyncio.wait_for(served, 30) == 0


async def test_webhook_mode(make_bot, fake):
    port = free_port()
    url = f"http://127.0.0.1:{port}/telegram-hook"
    bot = await make_bot(telegram={"mode": "webhook", "webhook_url": url, "webhook_listen": "127.0.0.1",
                                   "webhook_port": port})
    hook = fake.calls_to("setWebhook")[-1]
    assert hook.params["url"] == url and hook.params.get("drop_pending_updates") in (None, "False", "false")
    secret = hook.params["secret_token"]
    update = {"update_id": 77, "message": {"message_id": 3, "date": int(time.time()),
                                           "chat": {"id": 700, "type": "private", "first_name": "W"},
                                           "from": {"id": 700, "is_bot": False, "first_name": "W"},
                                           "text": "hello there"}}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=update) as response:
            assert response.status == 403                                  # no secret, no entry
        async with session.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as response:
            assert response.status == 200
    await fake.wait_sent(700, 1)
    assert fake.calls_to("getUpdates") == []
    assert bot.engine_calls == [[("user", "hello there")]]


def test_api_urls():
    assert api_urls("") == ("https://api.telegram.org", "https://api.telegram.org/bot{token}",
                            "https://api.telegram.org/file/bot{token}")
    assert api_urls("http://localhost:8081/bot/")[1] == "http://localhost:8081/bot{token}"


async def test_mynah_run_serves_until_sigterm(tmp_path, tiny_dialogpt, fake):
    """The real `mynah run` process: answers, then SIGTERM stops it cleanly (exit 0), with
    debug logging on and still no token in its output."""
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\npath = "{tiny_dialogpt}"\n[storage]\npath = "{tmp_path / "run.sqlite3"}"\n'
        f'[generation]\nmax_new_tokens = 4\nseed = 1\n[chat]\nstream = false\n[telegram]\nbase_url = "{fake.base_url}"\n',
        encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TELEGRAM_BOT_TOKEN=TOKEN)
    env.pop("DISCORD_BOT_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.cli", "--config", str(config), "-v", "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
    output = asyncio.create_task(proc.stdout.read())
    try:
        fake.message(800, "hello there")
        await fake.wait_sent(800, 1, timeout=40)
        fake.delay_next("sendMessage", 1.0)
        fake.message(800, "good morning")
        await fake.wait_for(lambda: len(fake.calls_to("sendChatAction", 800)) >= 2)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log_text = (await output).decode(errors="replace")
    assert code == 0, log_text
    assert len(fake.sent(800)) == 2                      # the reply in flight was finished
    assert TOKEN not in log_text and SECRET_HALF not in log_text
    assert "stopped cleanly" in log_text
    db = sqlite3.connect(tmp_path / "run.sqlite3")
    assert db.execute("SELECT role, status FROM messages ORDER BY id").fetchall() == \
        [("user", "ok"), ("bot", "ok"), ("user", "ok"), ("bot", "ok")]
    assert not (tmp_path / "run.sqlite3-wal").exists() or (tmp_path / "run.sqlite3-wal").stat().st_size == 0
    db.close()


async def test_sixteen_messages_fetched_together_reach_the_engine_in_one_batch(bot, fake, monkeypatch):
    """A burst fetched by one getUpdates is prefilled as one batch (engine/serving/admission.py):
    admitted 1 + 15, the fifteen waited for the lone prefill and the burst ran one step longer."""
    from engine.serving.batcher import Engine

    groups: list[int] = []
    real = Engine._prefill

    def spy(self, loaded, admitted, running=None):
        groups.append(len(admitted))
        return real(self, loaded, admitted, running)

    monkeypatch.setattr(Engine, "_prefill", spy)
    fake.message(1, "hello there")                      # the bot is polling: the burst comes in one fetch
    await fake.wait_for(lambda: fake.sent(1), timeout=30)
    groups.clear()
    chats = list(range(2000, 2016))
    for chat in chats:
        fake.message(chat, f"hello there, I am chat {chat}")
    await fake.wait_for(lambda: all(fake.sent(c) for c in chats), timeout=30)
    fetches = [c for c in fake.calls if c.method == "getUpdates"]
    assert groups == [16], f"admitted in groups {groups} ({len(fetches)} getUpdates calls)"
