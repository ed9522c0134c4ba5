"""Discord catch-up: answer what was said to Mynah while it was not connected.

Telegram keeps undelivered updates for a day; Discord's gateway does not replay events a
session missed (the bot restarting, or a session that could not be resumed). So on every
fresh session (on_ready: start-up and after a failed resume) Mynah reads the history of
the DMs and channels with a recent conversation, since the newest message it stored there,
and hands each message to the cog exactly as if the gateway had delivered it: the usual
rules decide what is answered (a DM, a mention, a reply to Mynah). Only messages younger
than `[discord] catch_up_minutes` are considered, so a stale question is not answered
hours later. Each message is handled once: the cog claims message ids (live delivery and
catch-up may overlap), and storage recognises a message it already answered.
"""
from __future__ import annotations

import datetime
import logging
import time

import discord

from bots.platforms.discord.spec import SPEC

log = logging.getLogger(__name__)

ACTIVE_DAYS = 7          # chats whose last stored message is at most this old are read back
MAX_CHATS = 200          # at most this many of them (the most recently active first)
MAX_PER_CHAT = 100       # messages read back per chat


async def catch_up(bot: discord.Client, cog, messages, minutes: float) -> int:
    """Hand every missed message of the last `minutes` to the cog; returns how many were read."""
    if minutes <= 0:
        return 0
    now = time.time()
    cutoff = datetime.datetime.fromtimestamp(now - minutes * 60, datetime.timezone.utc)
    chats = await messages.recent_chats(SPEC.name, since=now - ACTIVE_DAYS * 86400, limit=MAX_CHATS)
    seen = 0
    for chat in chats:
        target = int(chat.thread_id or chat.platform_chat_id)
        try:
            channel = bot.get_channel(target) or await bot.fetch_channel(target)
            after = max(int(chat.newest_platform_id or 0), discord.utils.time_snowflake(cutoff))
            async for message in channel.history(after=discord.Object(after), limit=MAX_PER_CHAT,
                                                 oldest_first=True):
                if message.created_at < cutoff or cog.ignored(message):
                    continue
                seen += 1
                await cog.receive(message)
        except discord.HTTPException as exc:
            log.info("discord catch-up: cannot read channel %s: %s", target, exc)
    if seen:
        log.info("discord catch-up: read %d message(s) sent while disconnected", seen)
    return seen
