"""Issue 12 on Discord: catch-up after (re)connecting, private admin output for typed
commands in channels, replies left pending by a crash. The real discord.py client against
the fake REST API + gateway (tests/fakes/discord_api.py), reusing test_discord's fixtures."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

import tests.fakes.discord_api as fd
from bots.platforms.discord.adapter import DiscordAdapter
from bots.platforms.discord.cog import PRIVATELY_TEXT
from tests.test_discord import ADMIN_ID, MEMBER_ID, app, db_rows, fake, live, mention_of_bot  # noqa: F401

pytestmark = pytest.mark.timeout(60)
DM_CHANNEL = 900000000000000301


async def started(app, fake) -> DiscordAdapter:
    adapter = DiscordAdapter(app, fake.token, guild_ready_timeout=0.05)
    await adapter.start()
    await adapter.wait_caught_up()
    return adapter


def sent_to(fake, channel: int) -> list[dict]:
    return [p for p in fake.sent if p["channel_id"] == str(channel)]


async def test_dm_and_mention_sent_while_stopped_are_answered_once_after_start(fake, app):
    fake.dm_channel(DM_CHANNEL, MEMBER_ID)
    first = await started(app, fake)
    # the last conversation, 40 minutes ago (the bot has been down for 30 of them)
    await fake.user_message("hello there", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False, minutes_ago=40)
    await fake.user_message(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot(),
                            minutes_ago=40)
    await fake.wait_for(lambda: len(fake.sent) == 2)
    await first.stop()

    fake.sent_while_offline("too old to answer", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False,
                            minutes_ago=25)
    fake.sent_while_offline("are you there ?", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False,
                            minutes_ago=2)
    fake.sent_while_offline(f"<@{fd.BOT_ID}> good morning", user_id=MEMBER_ID, mentions=mention_of_bot(),
                            minutes_ago=1)
    fake.sent_while_offline("just chatting, not to the bot", user_id=MEMBER_ID, minutes_ago=1)

    second = await started(app, fake)
    try:
        await fake.wait_for(lambda: len(fake.sent) == 4)
        await asyncio.sleep(0.5)
        assert len(sent_to(fake, DM_CHANNEL)) == 2 and len(sent_to(fake, fd.CHANNEL_ID)) == 2
        users = [r[0] for r in db_rows(app, "SELECT text FROM messages WHERE role = 'user' ORDER BY id")]
        assert "are you there ?" in users and "good morning" in users
        assert "too old to answer" not in users and "just chatting, not to the bot" not in users
    finally:
        await second.stop()

    third = await started(app, fake)                        # another reconnect: nothing twice
    try:
        await asyncio.sleep(0.5)
        assert len(fake.sent) == 4
    finally:
        await third.stop()


async def test_catch_up_and_live_delivery_of_one_message_answer_once(fake, live):
    message = fake.message_data(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot())
    await fake.dispatch("MESSAGE_CREATE", message)
    live.on_session()                                       # a failed resume: READY again, catch-up
    await fake.wait_for(lambda: len(fake.sent) == 1)
    await live.wait_caught_up()
    await asyncio.sleep(0.5)
    assert len(fake.sent) == 1


async def test_typed_admin_command_in_a_channel_is_answered_in_dm(fake, live):
    await fake.user_message(f"<@{fd.BOT_ID}> /status", user_id=ADMIN_ID, mentions=mention_of_bot())
    await fake.wait_for(lambda: len(fake.sent) == 2)
    in_channel = sent_to(fake, fd.CHANNEL_ID)
    assert [p["content"] for p in in_channel] == [PRIVATELY_TEXT]
    private = [p for p in fake.sent if p["channel_id"] != str(fd.CHANNEL_ID)]
    assert "Model version" in private[0]["content"]


async def test_pending_reply_from_a_crash_is_resent_on_connect(fake, app):
    fake.dm_channel(DM_CHANNEL, MEMBER_ID)
    first = await started(app, fake)
    await fake.user_message("hello there", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False)
    await fake.wait_for(lambda: len(fake.sent) == 1)
    await first.stop()
    with sqlite3.connect(app.config.storage.path) as db:        # as kill -9 mid-send leaves it
        db.execute("UPDATE messages SET status = 'pending', platform_message_id = NULL WHERE role = 'bot'")
    second = await started(app, fake)
    try:
        await fake.wait_for(lambda: len(fake.sent) == 2)
        assert db_rows(app, "SELECT status FROM messages WHERE role = 'bot'") == [("ok",)]
    finally:
        await second.stop()


@pytest.mark.timeout(300)
async def test_gateway_unreachable_for_60_s_then_back_answers_what_was_sent_meanwhile(fake, app):
    fake.dm_channel(DM_CHANNEL, MEMBER_ID)
    adapter = await started(app, fake)
    try:
        await fake.user_message("hello there", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False)
        await fake.user_message(f"<@{fd.BOT_ID}> hello there", user_id=MEMBER_ID, mentions=mention_of_bot())
        await fake.wait_for(lambda: len(fake.sent) == 2)
        await fake.drop_gateway(down=True)
        await asyncio.sleep(1)
        fake.sent_while_offline("are you there ?", user_id=MEMBER_ID, channel_id=DM_CHANNEL, guild=False)
        fake.sent_while_offline(f"<@{fd.BOT_ID}> anyone ?", user_id=MEMBER_ID, mentions=mention_of_bot())
        await asyncio.sleep(60)
        fake.gateway_down = False
        await fake.wait_for(lambda: fake.sessions == 2, timeout=150)   # reconnected by itself: a new session
        await fake.wait_for(lambda: len(fake.sent) == 4, timeout=30)
        await adapter.wait_caught_up()
        await asyncio.sleep(0.5)
        assert len(sent_to(fake, DM_CHANNEL)) == 2 and len(sent_to(fake, fd.CHANNEL_ID)) == 2
    finally:
        await adapter.stop()


def test_reconnect_waits_are_capped_at_32_s_however_often_it_failed():
    """discord.py alone would wait up to 1024 s after ten failures in a row (a minute's outage)."""
    import discord.client
    import discord.shard

    from bots.platforms.discord.backoff import BoundedBackoff
    assert discord.client.ExponentialBackoff is BoundedBackoff and discord.shard.ExponentialBackoff is BoundedBackoff
    backoff = discord.client.ExponentialBackoff()
    waits = [backoff.delay() for _ in range(200)]
    assert max(waits) <= 32 and max(waits[20:]) > 8     # capped, still jittered and growing
