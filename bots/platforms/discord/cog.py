"""The Discord cog: turns Discord messages and slash commands into `Incoming`, hands them
to the shared `ChatService`, and sends each `Outgoing` back the Discord way. The slash
commands themselves are generated from the command table (discord/slash.py) and call
`run_command`.

Ids: chat_id is the channel id (the DM channel id in DMs; the parent channel id for a
thread, whose own id is the thread_id, so a thread keeps its own context).
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import discord
from cachetools import LRUCache
from discord.ext import commands

from bots.chat.commands import BY_NAME
from bots.chat.delivery import Delivery
from bots.chat.events import Incoming, Outgoing
from bots.chat.service import ERROR_TEXT
from bots.platforms.discord.sender import (MESSAGE_LIMIT, NO_DM_TEXT, NO_MENTIONS, PRIVATELY_TEXT,  # noqa: F401
                                           DiscordSender, InteractionSender)
from bots.platforms.discord.spec import SPEC

log = logging.getLogger(__name__)

CLAIMED_MAX = 10_000  # message ids remembered as handled (catch-up and live delivery may overlap)

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")
_SPACES = re.compile(r"[ \t]{2,}")


# ---- Discord -> Incoming -------------------------------------------------------------
def place(channel) -> tuple[str, str, str, str | None]:
    """(chat_type, chat_id, thread_id, title) of a channel, DM channel or thread."""
    if isinstance(channel, discord.Thread):
        guild, parent = channel.guild, channel.parent
        parent_name = parent.name if parent is not None else str(channel.parent_id)
        return "group", str(channel.parent_id), str(channel.id), f"{guild.name} #{parent_name} > {channel.name}"
    guild = getattr(channel, "guild", None)
    if guild is not None:
        return "group", str(channel.id), "", f"{guild.name} #{getattr(channel, 'name', channel.id)}"
    recipient = getattr(channel, "recipient", None)
    return "private", str(channel.id), "", f"DM with {recipient}" if recipient else None


def readable_text(message: discord.Message, bot_id: int) -> str:
    """The message as the model should read it: the bot's own mention removed, other
    mentions turned into names (no raw <@123> ids in the logs or the training data)."""
    users = {m.id: m.display_name for m in message.mentions}
    roles = {r.id: r.name for r in message.role_mentions}
    guild = message.guild

    def user(m: re.Match) -> str:
        uid = int(m.group(1))
        return "" if uid == bot_id else "@" + users.get(uid, "someone")

    def role(m: re.Match) -> str:
        rid = int(m.group(1))
        if guild is not None and guild.self_role is not None and rid == guild.self_role.id:
            return ""  # the bot's own managed role counts as mentioning the bot
        return "@" + roles.get(rid, "role")

    def channel(m: re.Match) -> str:
        found = guild.get_channel_or_thread(int(m.group(1))) if guild is not None else None
        return "#" + (found.name if found is not None else "channel")

    text = _USER_MENTION.sub(user, message.content)
    text = _ROLE_MENTION.sub(role, text)
    text = _CHANNEL_MENTION.sub(channel, text)
    return _SPACES.sub(" ", text).strip()


def mentions_bot(message: discord.Message, bot_user: discord.abc.User) -> bool:
    """A direct mention of the bot (or of its managed role); @everyone does not count."""
    if any(m.id == bot_user.id for m in message.mentions):
        return True
    guild = message.guild
    return guild is not None and guild.self_role is not None and guild.self_role in message.role_mentions


def message_kind(message: discord.Message, text: str) -> str:
    if text:
        return "text"
    if message.stickers:
        return "sticker"
    if message.attachments:
        return "attachment"
    return "text"  # nothing at all (an embed, a bare mention): ChatService ignores empty text


# ---- the cog -------------------------------------------------------------------------
class ChatCog(commands.Cog, name="Mynah"):
    """Messages and slash commands, all answered by the one shared ChatService.

    It gets what it needs from whoever builds it: the ChatService, the conversation log
    (to tell whether an undelivered reply target was the bot's), the `[discord]` settings,
    whether the platform is stopping, and how long a slash command may take before it is
    deferred."""

    def __init__(self, bot: commands.Bot, chat, store, settings, *, stopping: Callable[[], bool],
                 defer_after: float = 2.0, stream_edit_seconds: float | None = None, shared=None):
        self.bot = bot
        self.chat = chat
        self.store = store
        self.settings = settings              # the [discord] section of the config
        self.stopping = stopping
        self.defer_after = defer_after        # slash commands slower than this are deferred
        self.delivery = Delivery(chat, stream_edit_seconds=stream_edit_seconds)   # None: replies are sent whole
        self._inflight: set[asyncio.Task] = set()
        self._claimed: LRUCache[int, None] = LRUCache(CLAIMED_MAX)   # message ids taken
        self.shared = shared      # workers.SharedClaims with several workers (a shared database), else None

    def claim(self, message_id: int) -> bool:
        """True the first time a message id is seen: live delivery and catch-up may overlap."""
        if message_id in self._claimed:
            return False
        self._claimed[message_id] = None
        return True

    # ---- messages ---------------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        await self.receive(message)

    async def receive(self, message: discord.Message) -> None:
        """A message from the gateway or from catch-up: handled once, tracked until answered."""
        if self.stopping() or self.ignored(message) or not self.claim(message.id):
            return
        task = asyncio.current_task()
        self._inflight.add(task)
        try:
            if self.shared is not None and not await self.shared.take(message.id):
                return                     # another worker has it
            await self.handle_message(message)
            if self.shared is not None:
                await self.shared.done(message.id)
        finally:
            self._inflight.discard(task)

    def ignored(self, message: discord.Message) -> bool:
        """Its own messages, other bots and webhooks, and system messages are never answered."""
        me = self.bot.user
        if me is not None and message.author.id == me.id:
            return True
        return message.author.bot or message.webhook_id is not None or message.is_system()

    async def incoming(self, message: discord.Message) -> Incoming:
        me = self.bot.user
        chat_type, chat_id, thread_id, title = place(message.channel)
        text = readable_text(message, me.id)
        kind = message_kind(message, text)
        reply_to, reply_to_bot = None, False
        ref = message.reference
        if ref is not None and ref.message_id is not None:
            reply_to = str(ref.message_id)
            if isinstance(ref.resolved, discord.Message):
                reply_to_bot = ref.resolved.author.id == me.id
            else:  # not delivered with the message (deleted, or too old): ask the log
                db_chat = await self.store.chats.chat(
                    SPEC.name, chat_id, thread_id=thread_id, type=chat_type, title=title)
                reply_to_bot = await self.store.messages.is_bot_message(db_chat, ref.message_id)
        answer_all = {str(c) for c in self.settings.answer_all_channels}
        return Incoming(
            platform=SPEC.name, chat_id=chat_id, user_id=str(message.author.id),
            text=text if kind == "text" else None, chat_type=chat_type, user_name=message.author.display_name,
            thread_id=thread_id, chat_title=title, message_id=str(message.id), reply_to_message_id=reply_to,
            mentions_bot=mentions_bot(message, me), reply_to_bot=reply_to_bot,
            answer_all=chat_id in answer_all or (thread_id != "" and thread_id in answer_all), kind=kind,
            sender_is_chat_admin=None if chat_type == "private" else member_is_admin(message.channel, message.author),
            can_answer_privately=SPEC.can_answer_privately,
        )

    async def handle_message(self, message: discord.Message) -> None:
        msg = await self.incoming(message)
        quote = message if not msg.is_private else None  # in a DM the answer needs no quote
        await self.delivery.reply(msg, DiscordSender(message.channel, quote, author=message.author))

    async def send(self, channel: discord.abc.Messageable, out: Outgoing, *,
                   reply_to: discord.Message | None = None) -> list[discord.Message]:
        """Send one Outgoing as one or more messages of at most 2000 characters, then mark
        it delivered (with the first message's id) or failed (bots/chat/delivery.py)."""
        return await self.delivery.send(DiscordSender(channel, reply_to), out)

    async def drain(self, timeout: float) -> None:
        """Wait for the replies in flight (stop() calls this after intake has stopped)."""
        pending = {t for t in self._inflight if not t.done()}
        if pending:
            log.info("waiting for %d Discord replies in flight", len(pending))
            await asyncio.wait(pending, timeout=timeout)

    # ---- slash commands ---------------------------------------------------------------
    def interaction_incoming(self, interaction: discord.Interaction, name: str, args: str = "") -> Incoming:
        channel = interaction.channel
        if interaction.guild_id is None or channel is None:
            chat_type, chat_id, thread_id, title = "private", str(interaction.channel_id), "", None
        else:
            chat_type, chat_id, thread_id, title = place(channel)
        answer_all = {str(c) for c in self.settings.answer_all_channels}
        return Incoming(
            platform=SPEC.name, chat_id=chat_id, user_id=str(interaction.user.id),
            text=f"/{name} {args}".strip(), chat_type=chat_type, user_name=interaction.user.display_name,
            thread_id=thread_id, chat_title=title, mentions_bot=True, answer_all=chat_id in answer_all,
            sender_is_chat_admin=None if chat_type == "private" else _can_manage(interaction.permissions),
            can_answer_privately=SPEC.can_answer_privately,
        )

    async def run_command(self, interaction: discord.Interaction, name: str, args: str = "") -> None:
        """Answer a slash command through ChatService; defer when it takes a while."""
        if self.stopping():
            await interaction.response.send_message("I'm restarting; please try again in a minute.", ephemeral=True)
            return
        task = asyncio.ensure_future(self.chat.handle(self.interaction_incoming(interaction, name, args)))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            try:
                outgoing = await asyncio.wait_for(asyncio.shield(task), timeout=self.defer_after)
            except asyncio.TimeoutError:
                private = name in BY_NAME and BY_NAME[name].private   # only the asker sees "thinking…"
                await interaction.response.defer(ephemeral=private, thinking=True)
                outgoing = await task
        except discord.HTTPException as exc:  # the defer itself failed: the interaction is gone
            log.warning("could not defer /%s: %s", name, exc)
            return
        except Exception:
            log.exception("/%s failed", name)
            outgoing = [Outgoing(ERROR_TEXT, ephemeral=True)]
        if not outgoing:
            outgoing = [Outgoing("Done.", ephemeral=True)]
        for out in outgoing:
            await self.respond(interaction, out)

    async def respond(self, interaction: discord.Interaction, out: Outgoing) -> None:
        await self.delivery.send(InteractionSender(interaction, out.ephemeral), out)


def _can_manage(perms: discord.Permissions | None) -> bool:
    """A guild's settings for Mynah are for members who may manage its messages or the guild."""
    return bool(perms is not None and (perms.manage_messages or perms.manage_guild or perms.administrator))


def member_is_admin(channel, author) -> bool:
    """From the member data Discord sends with the message and the cached guild roles."""
    if not isinstance(author, discord.Member):
        return False
    try:
        return _can_manage(channel.permissions_for(author))
    except Exception:  # no role cache for this guild: the member's guild-wide permissions
        return _can_manage(getattr(author, "guild_permissions", None))
