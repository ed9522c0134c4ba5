"""Issue 12 on Telegram: nothing lost when storage or the network falters, floods cost little,
admin output stays private. The real PTB Application and a real SQLite file against the fake
Bot API (tests/fakes/telegram_api.py), as in test_telegram.py, whose harness this reuses.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
import time

import aiohttp
import pytest

from bots.chat.splitting import split_message, utf16_len
from bots.learning.export import allowed_dialogues
from bots.platforms.telegram.adapter import NO_PRIVATE_CHAT_TEXT, PRIVATELY_TEXT, TEXT_LIMIT
from tests.fakes.telegram_api import BOT_USERNAME, TOKEN
from tests.test_telegram import (ADMIN, ROOT, STICKER, Harness, bot, fake, free_port, make_bot,  # noqa: F401
                                 make_config)

pytestmark = pytest.mark.timeout(60)


def statuses(bot: Harness, chat: int) -> list[tuple[str, str]]:
    return [(r[0], r[4]) for r in bot.messages(chat)]


# ---- 1: storage failures hold the acknowledgement -----------------------------------------

@pytest.mark.timeout(150)
async def test_database_locked_for_40_s_message_is_stored_and_answered_after(make_bot, fake, caplog):
    caplog.set_level(logging.WARNING)
    bot = await make_bot(storage={"busy_timeout_ms": 1000, "write_retry_first_s": 0.2, "write_retry_max_s": 3})
    fake.message(1200, "hello there")
    await fake.wait_sent(1200, 1)
    await bot.idle()
    locker = sqlite3.connect(bot.config.storage.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")          # a backup tool holding the write lock
    try:
        update = fake.message(1200, "are you still there ?")
        await fake.wait_for(lambda: update["update_id"] in fake.served)
        started = time.monotonic()
        while time.monotonic() - started < 40:
            await asyncio.sleep(1)
            assert fake.confirmed_below <= update["update_id"], "acknowledged before it was stored"
            assert len(fake.sent(1200)) == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await fake.wait_sent(1200, 2, timeout=30)
    await bot.idle()
    assert [r[1] for r in bot.messages(1200) if r[0] == "user"] == ["hello there", "are you still there ?"]
    assert statuses(bot, 1200)[-1] == ("bot", "ok")
    await fake.wait_for(lambda: fake.confirmed_below > update["update_id"], timeout=20)
    held = [r.getMessage() for r in caplog.records if "held, not acknowledged" in r.getMessage()]
    assert held and "stored after" in caplog.text


async def test_stopping_while_storage_is_down_gives_the_update_back(make_bot, fake):
    bot = await make_bot(storage={"busy_timeout_ms": 200, "write_retry_first_s": 0.1, "write_retry_max_s": 0.5})
    locker = sqlite3.connect(bot.config.storage.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        update = fake.message(1210, "hello there")
        await fake.wait_for(lambda: update["update_id"] in fake.served)
        await asyncio.sleep(1)
        await bot.stop()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert fake.confirmed_below <= update["update_id"]     # Telegram still has it…
    again = await make_bot()
    await fake.wait_sent(1210, 1)                          # …and delivers it to the next start
    await again.idle()
    assert statuses(again, 1210) == [("user", "ok"), ("bot", "ok")]


# ---- 2: floods ------------------------------------------------------------------------------

async def test_burst_of_40_gets_at_most_limit_plus_one_replies_and_others_are_answered(make_bot, fake):
    bot = await make_bot(chat={"rate_limit_messages": 5})
    for i in range(40):
        fake.message(1300, f"message number {i}")
    fake.message(1301, "hello there")                      # someone else, meanwhile
    await fake.wait_sent(1301, 1, timeout=30)
    await fake.wait_for(lambda: len(fake.sent(1300)) >= 6, timeout=30)
    await bot.idle()
    texts = fake.texts(1300)
    assert len(texts) == 6 and sum("faster than I can think" in t for t in texts) == 1
    rows = statuses(bot, 1300)
    assert rows.count(("user", "ok")) == 5 and rows.count(("user", "limited")) == 35
    assert rows.count(("bot", "ok")) == 5
    # limited messages are never trained on or counted toward retraining
    assert await bot.app.store.messages.count_user_messages() == 5 + 1
    dialogue_text = " ".join(t for d in await allowed_dialogues(bot.app.store, bot.app.config.learning, [])
                             for t in d.turns())
    assert "message number 39" not in dialogue_text
    # nor shown to the model as context
    assert all("message number 39" not in text for call in bot.engine_calls for _, text in call)
    assert len(fake.calls_to("sendChatAction", 1300)) <= 20    # no "typing…" for each flood message


@pytest.mark.timeout(90)
async def test_a_slow_command_answer_does_not_hold_other_chats(bot, fake):
    """Issue 25 #3: commands are not stored, so the acknowledgement waited for their answers
    (throttled by the group's flood limit): a private chat waited 101 s. Now a command is
    acknowledged at once and another chat's message is fetched and answered meanwhile."""
    fake.delay_next("sendMessage", 20)                 # the group's /help answer takes 20 s to go out
    command = fake.message(-1300, "/help", user_id=1301, chat_type="group")
    await fake.wait_served(command)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    fake.message(1302, "hello there")
    await fake.wait_sent(1302, 1, timeout=15)
    assert time.monotonic() - started < 8
    assert fake.sent(-1300) == []                      # the /help answer is still on its way
    await fake.wait_sent(-1300, 1, timeout=40)


@pytest.mark.timeout(180)
async def test_per_chat_memory_stays_flat_as_chats_grow(make_bot, fake, monkeypatch):
    """Issue 25 #12: the adapter's per-chat maps grew with every chat ever seen. They are
    bounded (LRU for the newest message id, TTL + size for getChatMember answers): their
    size is the same after 600 chats as after 300 (the bound here is 100; 10,000 in use)."""
    monkeypatch.setattr("bots.platforms.telegram.adapter.CHATS_REMEMBERED", 100)
    bot = await make_bot()
    sizes = []
    chat = -1_000_000
    for batch in range(3):
        updates = []
        for _ in range(300 if batch == 0 else 150):
            chat -= 1
            updates.append(fake.message(chat, chat_type="group", user_id=5, sticker=STICKER))   # not answered
        for group in range(-2000 - 60 * batch, -2060 - 60 * batch, -1):
            updates.append(fake.message(group, "/optout", chat_type="group", user_id=5))          # getChatMember
        await fake.wait_served(updates[-1], timeout=60)
        await bot.idle()
        sizes.append((len(bot.adapter._newest), len(bot.adapter.chat_admins)))
    assert sizes == [(100, 60), (100, 100), (100, 100)]


async def test_30_admin_commands_with_3000_char_arguments_cost_little(make_bot, fake):
    bot = await make_bot(chat={"rate_limit_messages": 4})
    for _ in range(30):
        fake.message(1400, "/status " + "x" * 3000)
    await fake.wait_for(lambda: len(fake.sent(1400)) >= 5, timeout=30)
    await bot.idle()
    await asyncio.sleep(0.5)
    texts = fake.texts(1400)
    assert len(texts) == 5                                  # 4 refusals + 1 notice
    assert sum("admins only" in t for t in texts) == 4
    audit = bot.rows("SELECT command, args, allowed FROM admin_audit")
    assert len(audit) == 4 and all(len(args) <= 200 and allowed == 0 for _, args, allowed in audit)


async def test_unknown_command_echo_is_bounded_in_utf16(bot, fake):
    fake.message(1410, "/" + "😀" * 2085)                   # 4170 UTF-16 units
    await fake.wait_sent(1410, 1)
    text = fake.texts(1410)[0]
    assert "I don't know the command" in text and utf16_len(text) < 200


# ---- 4: replies in flight at kill -9 ----------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_kill_9_with_a_reply_in_flight_then_restart_resends_it(tmp_path, tiny_dialogpt, fake, make_bot, stream):
    """A whole reply in flight is resent; a streamed one (issue 25 #1: it used to be stored
    only once complete, so the crash lost it) is held as an empty pending row from the
    moment streaming starts, and written again and sent after the restart, once."""
    db_path = tmp_path / "mynah.sqlite3"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\npath = "{tiny_dialogpt}"\n[storage]\npath = "{db_path}"\n'
        f'[generation]\nmax_new_tokens = 4\nseed = 1\n[telegram]\nbase_url = "{fake.base_url}"\n'
        f'[chat]\nstream = {str(stream).lower()}\nstream_edit_seconds = 0.2\n', encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TELEGRAM_BOT_TOKEN=TOKEN)
    env.pop("DISCORD_BOT_TOKEN", None)
    fake.delay_next("sendMessage", 60)                       # the reply hangs in flight
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.cli", "--config", str(config), "run",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env, cwd=ROOT)
    try:
        fake.message(1500, "hello there")

        def pending() -> bool:
            if not db_path.exists():
                return False
            with sqlite3.connect(db_path) as db:
                try:
                    return db.execute("SELECT COUNT(*) FROM messages WHERE status = 'pending'").fetchone()[0] == 1
                except sqlite3.OperationalError:
                    return False

        for _ in range(400):
            if pending():
                break
            await asyncio.sleep(0.1)
        assert pending()
        await asyncio.sleep(0.3)                             # sendMessage is on the wire
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert fake.sent(1500) == []
    bot = await make_bot()                                   # same database file
    await fake.wait_sent(1500, 1)
    await bot.idle()
    await asyncio.sleep(0.5)
    assert len(fake.sent(1500)) == 1                         # resent once, not answered twice
    assert statuses(bot, 1500) == [("user", "ok"), ("bot", "ok")]
    assert fake.texts(1500)[0].strip() and bot.messages(1500)[1][1] == fake.texts(1500)[0]


async def test_old_pending_reply_is_marked_failed_and_never_in_context(make_bot, fake):
    bot = await make_bot()
    fake.message(1510, "hello there")
    await fake.wait_sent(1510, 1)
    await bot.stop()
    with sqlite3.connect(bot.config.storage.path) as db:      # as a crash long ago would leave it
        db.execute("UPDATE messages SET status = 'pending', created_at = created_at - 3600 WHERE role = 'bot'")
    bot = await make_bot()
    await fake.wait_for(lambda: statuses(bot, 1510)[-1] == ("bot", "failed"))
    fake.message(1510, "good morning")
    await fake.wait_sent(1510, 2)
    assert bot.engine_calls[-1] == [("user", "hello there"), ("user", "good morning")]


# ---- 5: UTF-16 ------------------------------------------------------------------------------

def test_4096_utf16_boundary_with_emoji_splits_correctly():
    text = "a" * 4094 + "😀" + "b" * 10                        # the emoji ends exactly at 4096 units
    parts = split_message(text, TEXT_LIMIT, utf16_len)
    assert parts == ["a" * 4094 + "😀", "b" * 10]
    text = "a" * 4095 + "😀" + "b"                             # it would straddle 4096: moved whole
    parts = split_message(text, TEXT_LIMIT, utf16_len)
    assert parts == ["a" * 4095, "😀b"] and all(utf16_len(p) <= TEXT_LIMIT for p in parts)
    emoji = "😀" * 5000
    parts = split_message(emoji, TEXT_LIMIT, utf16_len)
    assert "".join(parts) == emoji and [utf16_len(p) for p in parts] == [4096, 4096, 1808]


async def test_emoji_reply_over_4096_units_goes_through_the_real_bot(bot, fake):
    out_text = ("😀" * 1500 + " ") * 3                         # 4503 code points, 9003 UTF-16 units
    await bot.adapter.send(1520, __import__("bots.chat.events", fromlist=["Outgoing"]).Outgoing(out_text))
    sent = fake.texts(1520)
    assert len(sent) == 3 and all(utf16_len(t) <= 4096 for t in sent)
    assert "".join(sent) == out_text.replace(" ", "")


# ---- 6 + 8: anonymous admins, private admin output ------------------------------------------

async def test_channel_admins_can_forget_what_was_posted_under_its_name(bot, fake):
    """Issue 25 #7: "send as channel" posts are stored under the channel's id, so nobody's
    /forget reached them. Now a channel admin's `/forget @channel` does, and says so."""
    group, channel, owner, stranger = -1603, -1009001, 4242, 4343
    fake.chats[channel] = {"id": channel, "type": "channel", "title": "News", "username": "newsroom"}
    fake.chat_creators[channel].add(owner)
    as_channel = {"sender_chat": fake.chats[channel]}
    fake.message(group, f"@{BOT_USERNAME} hello from the channel", user_id=136817688, chat_type="supergroup",
                 first_name="Channel", **as_channel)
    await fake.wait_sent(group, 1)
    await bot.idle()
    assert [r[0] for r in bot.rows("SELECT u.platform_user_id FROM messages m JOIN users u ON u.id = m.user_id")] \
        == [str(channel)]

    fake.message(group, "/forget", user_id=136817688, chat_type="supergroup", first_name="Channel", **as_channel)
    await fake.wait_sent(group, 2)
    assert "/forget <the channel's id or @username>" in fake.texts(group)[1]      # how to do it instead
    fake.message(group, "/forget @newsroom", user_id=stranger, chat_type="supergroup")
    await fake.wait_sent(stranger, 1)
    assert "Only the admins of" in fake.texts(stranger)[0]
    fake.message(group, "/forget @newsroom", user_id=owner, chat_type="supergroup")
    await fake.wait_sent(owner, 1)
    await bot.idle()
    assert f"as an admin of {channel}, you had me delete 1 messages posted under its name" in fake.texts(owner)[0]
    assert bot.rows("SELECT COUNT(*) FROM messages WHERE role = 'user'") == [(0,)]
    assert bot.rows("SELECT args, allowed FROM admin_audit WHERE command = 'forget' ORDER BY id") == \
        [(f"posted as {channel}", 0), (f"posted as {channel}", 1)]

async def test_admin_output_in_a_group_goes_privately(bot, fake):
    group = -1600
    fake.message(group, "/status", user_id=ADMIN, chat_type="supergroup")
    await fake.wait_sent(ADMIN, 1)
    await fake.wait_sent(group, 1)
    assert "Model version" in fake.texts(ADMIN)[0]
    assert fake.texts(group) == [PRIVATELY_TEXT]


async def test_private_answer_to_someone_who_never_started_the_bot(bot, fake):
    group = -1601
    fake.fail_next("sendMessage", 403, description="Forbidden: bot can't initiate conversation with a user")
    fake.message(group, "/forget", user_id=777, chat_type="supergroup")
    await fake.wait_sent(group, 1)
    assert fake.texts(group) == [NO_PRIVATE_CHAT_TEXT]


async def test_anonymous_admin_is_refused_with_a_reason_and_cannot_forget(bot, fake):
    group = -1602
    anonymous = {"sender_chat": {"id": group, "type": "supergroup", "title": "g"}}
    fake.message(group, "/status", user_id=ADMIN, chat_type="supergroup", **anonymous)
    await fake.wait_sent(group, 1)
    assert "anonymously" in fake.texts(group)[0]
    fake.message(group, "/forget", user_id=ADMIN, chat_type="supergroup", **anonymous)
    await fake.wait_sent(group, 2)
    assert "anonymously" in fake.texts(group)[1]
    assert bot.rows("SELECT allowed FROM admin_audit") == [(0,)]


# ---- 11: network trouble ----------------------------------------------------------------------

@pytest.mark.timeout(180)
async def test_bot_api_unreachable_for_60_s_then_back_answers_everything_once(bot, fake):
    fake.message(1700, "hello there")
    await fake.wait_sent(1700, 1)
    await bot.idle()
    await fake.go_offline()
    try:
        pushed = [fake.message(1701 + i, "hello there") for i in range(3)]
        await asyncio.sleep(60)
    finally:
        await fake.go_online()
    await fake.wait_for(lambda: all(fake.sent(1701 + i) for i in range(3)), timeout=60)
    await bot.idle()
    await asyncio.sleep(1)
    assert [len(fake.sent(1701 + i)) for i in range(3)] == [1, 1, 1]
    assert all(u["update_id"] in fake.served for u in pushed)


async def test_second_instance_polling_the_same_token_stops_on_409(make_bot, fake, caplog):
    caplog.set_level(logging.ERROR)
    fake.exclusive_polling = True
    first = await make_bot()
    fake.message(1800, "hello there")
    await fake.wait_sent(1800, 1)
    first.adapter.newcomer_s = 0.0                         # it has been running "for a while"
    second = await make_bot()
    await fake.wait_for(lambda: second.adapter.conflict is not None, timeout=20)
    await fake.wait_for(lambda: not second.adapter.application.updater.running, timeout=20)
    assert "409 Conflict" in caplog.text
    assert first.adapter.conflict is None
    fake.message(1801, "good morning")
    await fake.wait_sent(1801, 1, timeout=40)              # the first one still serves, once
    await first.idle()
    await asyncio.sleep(0.5)
    assert len(fake.sent(1801)) == 1 and second.engine_calls == []


# ---- 9: webhook mode answers 200 only once the message is stored -----------------------------

async def test_webhook_200_goes_out_only_after_the_message_is_stored(make_bot, fake):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    bot = await make_bot(telegram={"mode": "webhook", "webhook_url": url, "webhook_listen": "127.0.0.1",
                                   "webhook_port": port},
                         storage={"busy_timeout_ms": 200, "write_retry_first_s": 0.1, "write_retry_max_s": 0.5})
    secret = fake.calls_to("setWebhook")[-1].params["secret_token"]
    update = {"update_id": 91, "message": {"message_id": 5, "date": int(time.time()),
                                           "chat": {"id": 710, "type": "private", "first_name": "W"},
                                           "from": {"id": 710, "is_bot": False, "first_name": "W"},
                                           "text": "hello there"}}
    locker = sqlite3.connect(bot.config.storage.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    async with aiohttp.ClientSession() as session:
        async def post() -> int:
            async with session.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret}) as r:
                return r.status

        first = asyncio.create_task(post())
        await asyncio.sleep(2)
        repeat = asyncio.create_task(post())          # Telegram retries a post it got no answer to
        await asyncio.sleep(1)
        assert not first.done() and not repeat.done()  # no 200 while the message is not stored
        assert bot.messages(710) == []
        locker.execute("ROLLBACK")
        locker.close()
        assert await first == 200
        assert [r[1] for r in bot.messages(710) if r[0] == "user"] == ["hello there"]
        assert await repeat == 200
    await fake.wait_sent(710, 1)
    await bot.idle()
    await asyncio.sleep(0.5)
    assert len(fake.sent(710)) == 1 and statuses(bot, 710) == [("user", "ok"), ("bot", "ok")]
