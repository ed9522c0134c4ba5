"""Discord's side of delivery (bots/chat/delivery.py): a channel, thread or DM, or the
answer to a slash command. 2000 characters a message; nothing the bot sends ever pings
anyone (`allowed_mentions` is "none"); the typing indicator is kept alive by discord.py.
"""
from __future__ import annotations

import contextlib
import logging

import discord

from bots.chat.delivery import Sender

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's limit on message content, in characters
PRIVATELY_TEXT = "I've sent you the answer in a DM."
NO_DM_TEXT = "That answer is for you only, but I can't DM you: allow DMs from server members, or use the slash command."
NO_MENTIONS = discord.AllowedMentions.none()  # generated text must never ping anyone


class DiscordSender(Sender):
    """A channel, thread or DM; `reply_to` is the message the answers quote (None in DMs)."""

    limit = MESSAGE_LIMIT
    caption_limit = MESSAGE_LIMIT
    send_errors = (discord.HTTPException,)
    privately_text = PRIVATELY_TEXT
    no_private_text = NO_DM_TEXT

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None = None, author=None):
        self.channel = channel
        self.reply_to = reply_to
        self.author = author              # the asker: their DMs are the private chat

    def quote(self, out):
        return self.reply_to

    def _options(self, quote) -> dict:
        options = {"allowed_mentions": NO_MENTIONS}
        if quote is not None:
            options["reference"] = quote.to_reference(fail_if_not_exists=False)
            options["mention_author"] = False
        return options

    async def send_text(self, text: str, *, quote=None, buttons: bool = False) -> discord.Message:
        return await self.channel.send(text, **self._options(quote))

    async def send_image(self, image, caption, *, quote=None) -> discord.Message:
        return await self.channel.send(caption, file=discord.File(image), **self._options(quote))

    async def edit(self, message: discord.Message, text: str) -> None:
        await message.edit(content=text, allowed_mentions=NO_MENTIONS)

    async def private(self) -> Sender | None:
        if self.author is None:
            return None
        dm = self.author.dm_channel or await self.author.create_dm()
        return DiscordSender(dm)

    @contextlib.asynccontextmanager
    async def typing(self):
        """The typing indicator while the body runs; a channel that refuses it does not stop the reply."""
        indicator = self.channel.typing()
        try:
            await indicator.__aenter__()
        except discord.HTTPException as exc:
            log.debug("no typing indicator in %s: %s", getattr(self.channel, "id", "?"), exc)
            yield
            return
        try:
            yield
        finally:
            await indicator.__aexit__(None, None, None)


class InteractionSender(Sender):
    """The answer to a slash command: the interaction's response, then follow-ups; only the
    asker sees an ephemeral one."""

    limit = MESSAGE_LIMIT
    caption_limit = MESSAGE_LIMIT
    send_errors = (discord.HTTPException,)

    def __init__(self, interaction: discord.Interaction, ephemeral: bool):
        self.interaction = interaction
        self.ephemeral = ephemeral

    async def _send(self, content, **options):
        options.update(ephemeral=self.ephemeral, allowed_mentions=NO_MENTIONS)
        if not self.interaction.response.is_done():
            await self.interaction.response.send_message(content, **options)
            return None          # the first response has no message id of its own
        return await self.interaction.followup.send(content, wait=True, **options)

    async def send_text(self, text: str, *, quote=None, buttons: bool = False):
        return await self._send(text)

    async def send_image(self, image, caption, *, quote=None):
        return await self._send(caption, file=discord.File(image))
