"""Discord reactions on the bot's replies: the real discord.py client against the fake
gateway (MESSAGE_REACTION_ADD / _REMOVE), stored against the right reply and version."""
from __future__ import annotations

import asyncio

import discord
import pytest

import tests.fakes.discord_api as fd
from tests.test_discord import MEMBER_ID, app, db_rows, fake, live, mention_of_bot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)
OTHER_ID = 900000000000000300


async def _until(predicate, timeout: float = 10.0):
    async def poll():
        while not (value := predicate()):
            await asyncio.sleep(0.02)
        return value
    return await asyncio.wait_for(poll(), timeout)


def _feedback(app):
    return db_rows(app, "SELECT m.platform_message_id, f.signal, f.value, m.model_version, u.platform_user_id "
                        "FROM feedback f JOIN messages m ON m.id = f.message_id JOIN users u ON u.id = f.user_id "
                        "ORDER BY f.id")


async def _bot_reply(fake, app, text: str, channel_id: int = fd.CHANNEL_ID) -> str:
    """Mention the bot; the platform id of its (delivered) reply."""
    last = db_rows(app, "SELECT COALESCE(MAX(id), 0) FROM messages")[0][0]
    await fake.user_message(f"<@{fd.BOT_ID}> {text}", user_id=MEMBER_ID, mentions=mention_of_bot(),
                            channel_id=channel_id)
    return (await _until(lambda: db_rows(app, "SELECT platform_message_id FROM messages WHERE role = 'bot' "
                                              "AND status = 'ok' AND id > ?", last)))[0][0]


async def test_discord_reactions_are_stored_against_the_reply_and_version(fake, live):
    intents = discord.Intents._from_value(fake.identify["intents"])
    assert intents.guild_reactions and intents.dm_reactions
    app = live.app
    reply = await _bot_reply(fake, app, "hello there")
    version = db_rows(app, "SELECT model_version FROM messages WHERE platform_message_id = ?", reply)[0][0]
    await fake.reaction(int(reply), "👎", user_id=MEMBER_ID)
    rows = await _until(lambda: _feedback(app))
    assert rows == [(reply, "reaction:👎", -1, version, str(MEMBER_ID))]
    await fake.reaction(int(reply), "👎", user_id=MEMBER_ID, remove=True)
    await _until(lambda: not _feedback(app))
    # in a thread the event's channel is the thread: the reply is still found
    in_thread = await _bot_reply(fake, app, "in the thread", channel_id=fd.THREAD_ID)
    await fake.reaction(int(in_thread), "❤️", user_id=MEMBER_ID, channel_id=fd.THREAD_ID)
    assert (await _until(lambda: _feedback(app)))[0][:3] == (in_thread, "reaction:❤", 1)


async def test_discord_reactions_from_bots_or_in_opted_out_chats_are_not_stored(fake, live):
    app = live.app
    first = await _bot_reply(fake, app, "hello there")
    await fake.reaction(int(first), "👍", user_id=fd.BOT_ID, bot=True)       # the bot itself
    await fake.reaction(int(first), "👍", user_id=OTHER_ID, bot=True)        # another bot
    # a moderator opts the channel out (their own messages too; the member's own consent stays)
    await fake.slash_command("optout", user_id=fd.OWNER_ID, permissions=fd.EVERYONE_PERMISSIONS | fd.MANAGE_MESSAGES)
    await _until(lambda: db_rows(app, "SELECT 1 FROM chats WHERE consent = 0"))
    opted_out = await _bot_reply(fake, app, "still there ?")
    await fake.reaction(int(opted_out), "👎", user_id=MEMBER_ID)
    in_thread = await _bot_reply(fake, app, "thread chat", channel_id=fd.THREAD_ID)   # its own chat, opted in
    await fake.reaction(int(in_thread), "👍", user_id=MEMBER_ID, channel_id=fd.THREAD_ID)
    rows = await _until(lambda: _feedback(app))     # events arrive in order: the earlier ones are done
    assert [r[0] for r in rows] == [in_thread]
