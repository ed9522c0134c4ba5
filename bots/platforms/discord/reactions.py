"""Discord feedback: reactions on the bot's replies, from the raw gateway events.

The raw events (`on_raw_reaction_add` / `_remove`) arrive whether or not the message is
in discord.py's cache, so a reaction on an old reply still counts. They need the
`guild_reactions` and `dm_reactions` intents (not privileged; see adapter.required_intents).
A Discord message id is unique across channels, so the reply is found by its id alone,
also in threads. The bot's own reactions and other bots' are ignored; unicode emoji map
through [feedback] positive / negative, custom server emoji are neutral.
"""
from __future__ import annotations

import logging

import discord
from discord.ext import commands

from bots.platforms.discord.spec import SPEC

log = logging.getLogger(__name__)


def emoji_key(emoji: discord.PartialEmoji) -> str:
    return emoji.name if emoji.is_unicode_emoji() else f"custom:{emoji.id}"


class FeedbackCog(commands.Cog, name="MynahFeedback"):
    def __init__(self, bot: commands.Bot, recorder):
        self.bot = bot
        self.recorder = recorder       # bots.feedback.FeedbackRecorder

    def _ours(self, payload: discord.RawReactionActionEvent) -> bool:
        me = self.bot.user
        if me is not None and payload.user_id == me.id:
            return False
        member = payload.member
        return not (member is not None and member.bot)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        if not self._ours(payload):
            return
        name = payload.member.display_name if payload.member is not None else None
        try:
            await self.recorder.add_reaction(SPEC.name, None, payload.message_id, payload.user_id,
                                             emoji_key(payload.emoji), user_name=name)
        except Exception:  # feedback is never worth a crash
            log.exception("could not store a Discord reaction")

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        if not self._ours(payload):
            return
        try:
            await self.recorder.remove_reaction(SPEC.name, None, payload.message_id, payload.user_id,
                                                emoji_key(payload.emoji))
        except Exception:
            log.exception("could not remove a Discord reaction")
