"""Discord: the real discord.py client (commands.Bot + the Mynah cog) on the real engine
(tiny model) and real SQLite.

Two ways to drive it, neither of which contacts discord.com:
- dpytest (messages, mentions, DMs, permissions), with its known caveats: intents.members
  must be on, `bot._connection.loop` must be the running loop for typing, replies lose
  message_reference, and there is no 2000-character limit (so the split is counted here);
- tests/fakes/discord_api.py, a local REST API + gateway, for what dpytest cannot do: login
  (bad token), IDENTIFY (missing intent), READY, slash-command sync, interactions, the
  exact JSON the bot sends.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend as dpy_backend
from discord.ext.test import callbacks as dpy_callbacks
from discord.ext.test import factories as dpy_factories

from bots.app import Mynah
from bots.chat.service import NON_TEXT_TEXT
from bots.config import parse_config
from bots.chat.events import Outgoing, PlatformStartError
from bots.platforms.discord.adapter import DiscordAdapter, required_intents
from bots.platforms.discord.cog import MESSAGE_LIMIT
from bots.runner import serve
import tests.fakes.discord_api as fd
from tests.fakes.telegram_api import TOKEN as TELEGRAM_TOKEN, FakeTelegram

pytestmark = pytest.mark.timeout(60)

ADMIN_ID = 900000000000000100
MEMBER_ID = 900000000000000200


def make_config(tmp_path, model, **sections):
    raw = {
        "model": {"path": str(model)},
        "storage": {"path": str(tmp_path / "db.sqlite3")},
        "generation": {"max_new_tokens": 4, "seed": 3},
        "admins": {"discord": [ADMIN_ID]},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


@pytest.fixture
async def app(tmp_path, tiny_dialogpt):
    mynah = await Mynah.open(make_config(tmp_path, tiny_dialogpt))
    yield mynah
    await mynah.close()


def db_rows(app, sql, *args):
    con = sqlite3.connect(app.config.storage.path)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def chat_messages(app, platform_chat_id, thread_id=""):
    return db_rows(app, "SELECT m.role, m.text, m.status, m.platform_message_id, m.reply_to_platform_id "
                        "FROM messages m JOIN chats c ON c.id = m.chat_id "
                        "WHERE c.platform = 'discord' AND c.platform_chat_id = ? AND c.thread_id = ? ORDER BY m.id",
                   str(platform_chat_id), str(thread_id))


# ---- dpytest -------------------------------------------------------------------------
@pytest.fixture
async def dbot(app):
    """The adapter's bot, wired to dpytest's fake backend (not started: no login)."""
    intents = required_intents()
    intents.members = True  # dpytest needs it to know the guild's members
    adapter = DiscordAdapter(app, "not-a-real-token", intents=intents)
    bot = adapter.build_bot()
    await bot._async_setup_hook()
    await bot.install()  # the cog and the slash commands; setup_hook would also sync them: not in dpytest
    dpytest.configure(bot, members=["alice", "bob"])
    bot._connection.loop = asyncio.get_running_loop()  # for channel.typing()
    typing_in = []

    async def on_typing(channel):
        typing_in.append(channel.id)

    dpy_callbacks.set_callback(on_typing, "send_typing")
    adapter.typing_in = typing_in
    yield adapter
    await dpytest.empty_queue()


def sent_messages() -> list[discord.Message]:
    out = []
    while not dpytest.sent_queue.empty():
        out.append(dpytest.get_message())
    return out


def user_reply(content, author, channel, *, to: discord.Message, resolved: bool = True) -> discord.Message:
    """A user's reply to `to`, as the gateway delivers it (dpytest cannot make replies)."""
    data = dpy_factories.make_message_dict(channel, author, content=content, guild_id=channel.guild.id,
                                           mentions=[])
    data["type"] = 19
    data["message_reference"] = {"message_id": str(to.id), "channel_id": str(channel.id),
                                 "guild_id": str(channel.guild.id)}
    if resolved:
        data["referenced_message"] = dpy_factories.dict_from_message(to)
    state = dpy_backend.get_state()
    state.parse_message_create(data)
    return state._get_message(data["id"])


async def test_dm_every_message_is_answered_and_the_dm_remembers(dbot):
    alice = dpytest.get_config().members[0]
    dm = await alice.create_dm()
    await dpytest.message("hello there", channel=dm, member=alice)
    await dpytest.message("what do you like to do ?", channel=dm, member=alice)
    replies = sent_messages()
    assert len(replies) == 2 and all(r.channel.id == dm.id for r in replies)
    assert dm.id in dbot.typing_in  # typing indicator while generating

    rows = chat_messages(dbot.app, dm.id)
    assert [(r[0], r[1]) for r in rows if r[0] == "user"] == [("user", "hello there"),
                                                              ("user", "what do you like to do ?")]
    # the bot turns were delivered and carry the Discord message ids
    assert [(r[0], r[2], r[3]) for r in rows if r[0] == "bot"] == [("bot", "ok", str(m.id)) for m in replies]
    # the context the next reply is built from holds both earlier turns and both replies
    conv = dbot.app.store
    turns = await conv.messages.context(await conv.chats.chat("discord", str(dm.id)), 10)
    assert [t.role for t in turns] == ["user", "bot", "user", "bot"]
    assert turns[2].text == "what do you like to do ?"


async def test_guild_channel_answers_mention_and_reply_only(dbot):
    cfg = dpytest.get_config()
    channel, alice, bob = cfg.channels[0], cfg.members[0], cfg.members[1]
    me = dbot.bot.user

    await dpytest.message("just chatting among humans", channel=channel, member=alice)
    await dpytest.message("@everyone hello", channel=channel, member=alice)
    assert sent_messages() == [] and chat_messages(dbot.app, channel.id) == []
    assert dbot.typing_in == []  # nor a typing indicator for messages it will not answer

    await dpytest.message(f"<@{me.id}> hello there", channel=channel, member=alice)
    [answer] = sent_messages()
    assert chat_messages(dbot.app, channel.id)[0][:2] == ("user", "hello there")  # mention stripped

    # a reply to the bot (the gateway resolves it) is answered
    reply = user_reply("i like to read books", bob, channel, to=answer)
    await dpytest.run_all_events()
    assert len(sent_messages()) == 1
    # a reply whose target was not delivered: the log says it was the bot's message
    user_reply("do you have a dog ?", alice, channel, to=answer, resolved=False)
    await dpytest.run_all_events()
    assert len(sent_messages()) == 1
    # a reply to a human is not
    user_reply("me too", alice, channel, to=reply)
    await dpytest.run_all_events()
    assert sent_messages() == []

    users = [r for r in chat_messages(dbot.app, channel.id) if r[0] == "user"]
    assert [u[1] for u in users] == ["hello there", "i like to read books", "do you have a dog ?"]
    assert users[1][4] == str(answer.id)  # reply-to stored with Discord's id


async def test_answer_all_channel_answers_everything(dbot):
    cfg = dpytest.get_config()
    channel, alice = cfg.channels[0], cfg.members[0]
    dbot.app.config.discord.answer_all_channels = [channel.id]
    await dpytest.message("anyone around ?", channel=channel, member=alice)
    assert len(sent_messages()) == 1


async def test_no_reply_to_other_bots_or_to_itself(dbot):
    cfg = dpytest.get_config()
    channel, guild = cfg.channels[0], cfg.guilds[0]
    me = dbot.bot.user
    robot_user = dpy_backend.make_user("robot", "0042")
    robot_user.bot = True
    robot = dpy_backend.make_member(robot_user, guild)
    await dpytest.message(f"<@{me.id}> hello bot", channel=channel, member=robot)
    dm = await robot_user.create_dm()
    await dpytest.message("hello bot", channel=dm, member=robot_user)
    # its own message, mentioning itself, in a guild channel and in a DM
    await dpytest.message(f"<@{me.id}> talking to myself", channel=channel, member=guild.me)
    alice_dm = await cfg.members[0].create_dm()
    dpy_backend.make_message("hello from me", me, alice_dm)
    await dpytest.run_all_events()
    assert sent_messages() == []
    assert db_rows(dbot.app, "SELECT COUNT(*) FROM messages") == [(0,)]


async def test_typed_reset_goes_through_the_shared_chat_logic(dbot):
    alice = dpytest.get_config().members[0]
    dm = await alice.create_dm()
    await dpytest.message("hello there", channel=dm, member=alice)
    await dpytest.message("/reset", channel=dm, member=alice)
    replies = sent_messages()
    assert replies[-1].content.startswith("Fresh start")
    await dpytest.message("good morning", channel=dm, member=alice)
    sent_messages()
    conv = dbot.app.store
    turns = await conv.messages.context(await conv.chats.chat("discord", str(dm.id)), 10)
    assert [t.text for t in turns if t.role == "user"] == ["good morning"]
    assert db_rows(dbot.app, "SELECT COUNT(*) FROM context_resets") == [(1,)]
    # in a guild channel too, typed after a mention or bare (a command needs no mention), by a
    # member who may manage messages (a group's settings are for its admins)
    channel = dpytest.get_config().channels[0]
    await dpytest.message("/reset", channel=channel, member=alice)
    assert "only this group's admins" in sent_messages()[-1].content
    mods = dpy_backend.make_role("mods", channel.guild, permissions=discord.Permissions(manage_messages=True).value)
    await dpytest.add_role(alice, mods)
    await dpytest.message(f"<@{dbot.bot.user.id}> /reset", channel=channel, member=alice)
    await dpytest.message("/reset", channel=channel, member=alice)
    assert [m.content.startswith("Fresh start") for m in sent_messages()] == [True, True]
    assert db_rows(dbot.app, "SELECT COUNT(*) FROM context_resets") == [(3,)]


async def test_typed_admin_command_from_non_admin_is_refused_and_audited(dbot):
    cfg = dpytest.get_config()
    channel, alice = cfg.channels[0], cfg.members[0]
    await dpytest.message("/status", channel=channel, member=alice)
    [refusal] = sent_messages()
    assert "admins only" in refusal.content
    assert db_rows(dbot.app, "SELECT platform, platform_user_id, command, allowed FROM admin_audit") == [
        ("discord", str(alice.id), "status", 0)]


async def test_attachments_only_get_a_note_in_dms_and_are_ignored_in_channels(dbot, tmp_path):
    cfg = dpytest.get_config()
    channel, alice = cfg.channels[0], cfg.members[0]
    picture = tmp_path / "cat.png"
    picture.write_bytes(b"\x89PNG")
    dm = await alice.create_dm()
    await dpytest.message("", channel=dm, member=alice, attachments=[str(picture)])
    assert [m.content for m in sent_messages()] == [NON_TEXT_TEXT]
    await dpytest.message(f"<@{dbot.bot.user.id}>", channel=channel, member=alice, attachments=[str(picture)])
    assert sent_messages() == []


async def test_rate_limit_is_the_shared_one(dbot):
    dbot.app.chat.limiter.max_events = 2
    alice = dpytest.get_config().members[0]
    dm = await alice.create_dm()
    for text in ("hello there", "good morning", "good night"):
        await dpytest.message(text, channel=dm, member=alice)
    replies = [m.content for m in sent_messages()]
    assert len(replies) == 3 and "faster than I can think" in replies[2]


async def test_long_reply_is_split_into_parts_of_at_most_2000(dbot):
    channel = dpytest.get_config().channels[0]
    app = dbot.app
    conv = app.store
    chat_id = await conv.chats.chat("discord", str(channel.id), type="group")
    paragraph = "This is a sentence that goes on for a while. " * 10  # 450 characters
    text = "\n\n".join(paragraph.strip() for _ in range(10))
    assert len(text) >= 4500
    stored = await conv.messages.log_message(chat_id, "bot", text, status="pending")

    parts = await dbot.cog.send(channel, Outgoing(text, stored_id=stored))
    received = sent_messages()
    assert len(received) == len(parts) == 3
    assert all(0 < len(m.content) <= MESSAGE_LIMIT for m in received)
    assert " ".join(m.content for m in received).split() == text.split()  # nothing truncated
    assert db_rows(app, "SELECT status, platform_message_id FROM messages WHERE id = ?", stored) == [
        ("ok", str(received[0].id))]


# ---- fake Discord (REST + gateway) ---------------------------------------------------
@pytest.fixture
async def fake(monkeypatch):
    async with fd.FakeDiscord() as server:
        server.install(monkeypatch)
        yield server


@pytest.fixture
async def live(fake, app):
    """The adapter started for real against the fake Discord."""
    adapter = DiscordAdapter(app, fake.token, guild_ready_timeout=0.05)
    await adapter.start()
    yield adapter
    await adapter.stop()


def mention_of_bot():
    return [{"id": str(fd.BOT_ID), "username": "Mynah", "discriminator": "0", "avatar": None, "bot": True}]


async def test_start_returns_when_ready_with_intents_and_synced_commands(fake, tmp_path, tiny_dialogpt, caplog):
    caplog.set_level(logging.DEBUG)
    config = make_config(tmp_path, tiny_dialogpt, discord={"command_guilds": [fd.GUILD_ID]})
    async with await Mynah.open(config) as app:
        adapter = DiscordAdapter(app, fake.token, guild_ready_timeout=0.05)
        await adapter.start()
        try:
            assert adapter.bot.is_ready() and adapter.ready.is_set()
            intents = discord.Intents._from_value(fake.identify["intents"])
            assert intents.message_content and intents.guilds and intents.guild_messages and intents.dm_messages
            assert not intents.members and not intents.presences  # nothing privileged it does not need
            assert sorted(fake.synced[str(fd.GUILD_ID)]) == sorted(
                ["reset", "forget", "optout", "optin", "persona", "memory", "help", "retrain", "status", "rollback", "models",
                 "promote"])
            assert "global" not in fake.synced
            # the shared redaction helper scrubs the token from any log line, tracebacks included
            try:
                raise RuntimeError(f"request with {fake.token} failed")
            except RuntimeError:
                logging.getLogger("mynah.test").exception("logged by mistake: %s", fake.token)
        finally:
            await adapter.stop()
        assert adapter.bot.is_closed()
    assert "logged by mistake: <DISCORD_BOT_TOKEN>" in caplog.text
    assert fake.token not in caplog.text


async def test_bad_token_is_a_clear_start_error_and_a_nonzero_exit(fake, app, tmp_path, tiny_dialogpt, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "MTIz.wrong-token.xyz"
    adapter = DiscordAdapter(app, wrong)
    with pytest.raises(PlatformStartError, match="rejected the bot token.*DISCORD_BOT_TOKEN") as err:
        await adapter.start()
    assert wrong not in str(err.value)
    assert adapter.bot.is_closed()
    assert fake.requests == [("GET", "/users/@me")]  # stopped at login

    # `mynah run` with that token: an error line, exit status 1, the engine and db closed
    config = make_config(tmp_path, tiny_dialogpt)
    code = await serve(config, environ={"DISCORD_BOT_TOKEN": wrong}, stop_event=asyncio.Event())
    assert code == 1
    assert "rejected the bot token" in caplog.text
    assert wrong not in caplog.text


async def test_missing_message_content_intent_is_a_clear_start_error(monkeypatch, app):
    async with fd.FakeDiscord(refuse_intents=True) as server:
        server.install(monkeypatch)
        adapter = DiscordAdapter(app, server.token)
        with pytest.raises(PlatformStartError, match="Message Content"):
            await adapter.start()
        assert server.identify is not None  # it got as far as IDENTIFY


async def test_mention_over_the_gateway_replies_without_pinging_anyone(fake, live):
    await fake.user_message(f"<@{fd.BOT_ID}> hello there @everyone", user_id=MEMBER_ID, mentions=mention_of_bot())
    sent = await fake.wait_for(lambda: fake.sent)
    assert sent[0]["allowed_mentions"] == {"parse": [], "replied_user": False}
    assert sent[0]["message_reference"]["fail_if_not_exists"] is False  # a reply to the message
    assert str(fd.CHANNEL_ID) in fake.typing

    # generated text that tries to ping: sent as-is, but Discord is told to ping no one
    await live.cog.send(live.bot.get_channel(fd.CHANNEL_ID), Outgoing(f"@everyone @here <@{MEMBER_ID}> <@&123>"))
    payload = fake.sent[-1]
    assert payload["content"].startswith("@everyone") and payload["allowed_mentions"]["parse"] == []


async def test_thread_has_its_own_context(fake, live):
    await fake.user_message(f"<@{fd.BOT_ID}> in the channel", user_id=MEMBER_ID, mentions=mention_of_bot())
    await fake.wait_for(lambda: len(fake.sent) == 1)
    await fake.user_message(f"<@{fd.BOT_ID}> in the thread", user_id=MEMBER_ID, channel_id=fd.THREAD_ID,
                            mentions=mention_of_bot())
    await fake.wait_for(lambda: len(fake.sent) == 2)
    assert fake.sent[1]["channel_id"] == str(fd.THREAD_ID)
    app = live.app
    channel = [r[1] for r in chat_messages(app, fd.CHANNEL_ID) if r[0] == "user"]
    thread = [r[1] for r in chat_messages(app, fd.CHANNEL_ID, fd.THREAD_ID) if r[0] == "user"]
    assert channel == ["in the channel"] and thread == ["in the thread"]
    title = db_rows(app, "SELECT title FROM chats WHERE thread_id = ?", str(fd.THREAD_ID))[0][0]
    assert "Test Server" in title and "a thread" in title


async def test_admin_slash_command_refused_for_non_admin_accepted_for_admin(fake, live):
    await fake.slash_command("status", user_id=MEMBER_ID)
    await fake.wait_for(lambda: len(fake.callbacks) == 1)
    refusal = fake.callbacks[0]
    assert refusal["type"] == 4 and refusal["data"]["flags"] == 64  # ephemeral
    assert "admins only" in refusal["data"]["content"]

    await fake.slash_command("status", user_id=ADMIN_ID)
    await fake.wait_for(lambda: len(fake.callbacks) == 2)
    status = fake.callbacks[1]
    assert status["data"]["flags"] == 64 and "Model version" in status["data"]["content"]

    assert db_rows(live.app, "SELECT platform_user_id, command, allowed FROM admin_audit ORDER BY id") == [
        (str(MEMBER_ID), "status", 0), (str(ADMIN_ID), "status", 1)]


async def test_slash_reset_uses_the_shared_chat_logic(fake, live):
    await fake.user_message(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot())
    await fake.wait_for(lambda: fake.sent)
    # a member without manage-messages / manage-guild may not reset the channel's conversation
    await fake.slash_command("reset", user_id=MEMBER_ID)
    await fake.wait_for(lambda: fake.callbacks)
    assert "only this group's admins" in fake.callbacks[0]["data"]["content"]
    conv = live.app.store
    assert await conv.messages.context(await conv.chats.chat("discord", str(fd.CHANNEL_ID)), 10) != []
    await fake.slash_command("reset", user_id=MEMBER_ID, permissions=fd.EVERYONE_PERMISSIONS | fd.MANAGE_MESSAGES)
    await fake.wait_for(lambda: len(fake.callbacks) == 2)
    assert fake.callbacks[1]["data"]["content"].startswith("Fresh start")
    assert "flags" not in fake.callbacks[1]["data"]  # everyone in the channel sees it
    assert await conv.messages.context(await conv.chats.chat("discord", str(fd.CHANNEL_ID)), 10) == []


async def test_group_optout_by_a_moderator_cannot_be_undone_by_a_member(fake, live):
    """Typed commands: the member's roles (from the message) decide; both attempts are audited."""
    await fake.user_message("/optout", user_id=ADMIN_ID + 1, roles=[fd.MOD_ROLE_ID])
    await fake.wait_for(lambda: fake.sent)
    conv = live.app.store
    chat = await conv.chats.chat("discord", str(fd.CHANNEL_ID))
    assert not await conv.chats.consent(chat)
    await fake.user_message("/optin", user_id=MEMBER_ID)
    await fake.wait_for(lambda: len(fake.sent) == 2)
    assert "for its admins" in fake.sent[1]["content"]
    assert not await conv.chats.consent(chat)
    assert db_rows(live.app, "SELECT platform_user_id, command, allowed FROM admin_audit ORDER BY id") == [
        (str(ADMIN_ID + 1), "optout", 1), (str(MEMBER_ID), "optin", 0)]


async def test_slow_command_is_deferred_then_followed_up(fake, live):
    live.cog.defer_after = 0  # everything counts as slow
    await fake.slash_command("rollback", user_id=ADMIN_ID, options=[{"name": "version", "type": 3, "value": "v0001"}])
    await fake.wait_for(lambda: fake.followups)
    [deferred] = fake.callbacks
    assert deferred["type"] == 5 and deferred["data"]["flags"] == 64  # "thinking…", only for the asker
    assert "not available yet" in fake.followups[0]["content"]  # no learning loop in this app
    assert db_rows(live.app, "SELECT command, args, allowed FROM admin_audit") == [("rollback", "v0001", 1)]


async def test_a_send_that_fails_marks_the_reply_failed(fake, live):
    fake.forbidden.add(str(fd.CHANNEL_ID))  # the bot may not write there
    await fake.user_message(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot())
    await fake.wait_for(lambda: ("POST", f"/channels/{fd.CHANNEL_ID}/messages") in fake.requests)
    await asyncio.wait_for(live.cog.drain(10), 10)
    rows = chat_messages(live.app, fd.CHANNEL_ID)
    assert [(r[0], r[2]) for r in rows] == [("user", "ok"), ("bot", "failed")]
    conv = live.app.store  # a failed reply is not part of the context
    turns = await conv.messages.context(await conv.chats.chat("discord", str(fd.CHANNEL_ID)), 10)
    assert [t.role for t in turns] == ["user"]


async def test_telegram_and_discord_run_together_on_one_engine_and_one_database(
        fake, tmp_path, tiny_dialogpt, monkeypatch):
    """`mynah run` with both tokens: one Mynah (engine + db), both adapters answering."""
    opened = []
    real_open = Mynah.open.__func__

    async def recording_open(cls, config, **kwargs):
        opened.append(await real_open(cls, config, **kwargs))
        return opened[-1]

    monkeypatch.setattr(Mynah, "open", classmethod(recording_open))
    telegram = await FakeTelegram().start()
    try:
        config = make_config(tmp_path, tiny_dialogpt, telegram={"base_url": telegram.base_url})
        stop = asyncio.Event()
        environ = {"TELEGRAM_BOT_TOKEN": TELEGRAM_TOKEN, "DISCORD_BOT_TOKEN": fake.token}
        served = asyncio.create_task(serve(config, environ=environ, stop_event=stop))
        await fake.wait_for(lambda: fake.identify is not None, timeout=30)
        await telegram.wait_for(lambda: telegram.calls_to("getUpdates"), timeout=30)

        telegram.message(700, "hello there")
        await fake.user_message(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot())
        await telegram.wait_sent(700, 1)
        await fake.wait_for(lambda: fake.sent)
        stop.set()
        assert await asyncio.wait_for(served, 30) == 0
    finally:
        await telegram.close()

    [app] = opened
    assert app.engine.stats().replies == 2  # both replies came from the one engine
    rows = db_rows(app, "SELECT c.platform, m.role, m.status FROM messages m JOIN chats c ON c.id = m.chat_id "
                        "ORDER BY c.platform, m.id")
    assert rows == [("discord", "user", "ok"), ("discord", "bot", "ok"),
                    ("telegram", "user", "ok"), ("telegram", "bot", "ok")]


async def test_dm_over_the_gateway_is_answered_without_a_quote(fake, live):
    dm_channel = 900000000000000300
    await fake.user_message("hello there", user_id=MEMBER_ID, channel_id=dm_channel, guild=False)
    sent = await fake.wait_for(lambda: fake.sent)
    assert sent[0]["channel_id"] == str(dm_channel) and "message_reference" not in sent[0]
    assert db_rows(live.app, "SELECT type FROM chats WHERE platform_chat_id = ?", str(dm_channel)) == [("private",)]


async def test_two_workers_on_one_database_answer_a_discord_message_once(tmp_path, tiny_dialogpt, pg_url):
    """Two workers' sessions see the same gateway event (an overlapping shard, or catch-up
    racing the gateway): the claim in the shared database lets exactly one answer it."""
    from bots.platforms.discord.workers import SharedClaims

    config = make_config(tmp_path, tiny_dialogpt, storage={"url": pg_url, "path": ""})
    first, second = await Mynah.open(config), await Mynah.open(config)
    try:
        assert first.cluster is not None and second.cluster is not None and first.cluster.id != second.cluster.id
        intents = required_intents()
        intents.members = True
        adapter = DiscordAdapter(first, "not-a-real-token", intents=intents)
        bot = adapter.build_bot()
        await bot._async_setup_hook()
        await bot.install()
        dpytest.configure(bot, members=["alice"])
        bot._connection.loop = asyncio.get_running_loop()
        other_cog = DiscordAdapter(second, "not-a-real-token", intents=intents).make_cog(bot)
        assert isinstance(adapter.cog.shared, SharedClaims) and isinstance(other_cog.shared, SharedClaims)
        alice = dpytest.get_config().members[0]
        dm = await alice.create_dm()
        data = dpy_factories.make_message_dict(dm, alice, content="hello from two sessions")
        message = discord.Message(state=dpy_backend.get_state(), channel=dm, data=data)
        await asyncio.gather(adapter.cog.receive(message), other_cog.receive(message))
        replies = sent_messages()
        assert len(replies) == 1, [m.content for m in replies]
        db = first.store.db
        rows = await db.fetchall("SELECT m.role, m.status FROM messages m JOIN chats c ON c.id = m.chat_id "
                                 "WHERE c.platform = 'discord' ORDER BY m.id")
        assert [tuple(r) for r in rows] == [("user", "ok"), ("bot", "ok")]
        assert (await db.fetchone("SELECT done_at IS NOT NULL FROM update_claims WHERE platform = 'discord' "
                                  "AND update_key = ?", (str(message.id),)))[0]
    finally:
        await dpytest.empty_queue()
        await second.close()
        await first.close()
