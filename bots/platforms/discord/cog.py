"""The Discord cog: turns Discord messages and slash commands into `Incoming`, hands them
to the shared `ChatService`, and sends each `Outgoing` back the Discord way. The slash
commands themselves are generated from the command table (discord/slash.py) and call
`run_command`.

Ids: chat_id is the channel id (the DM channel id in DMs; the parent channel id for a
thread, whose own id is the thread_id, so a thread keeps its own context).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
from collections.abc import Callable

import discord
from discord.ext import commands

from bots.chat.commands import BY_NAME
from bots.chat.events import Incoming, Outgoing
from bots.chat.service import ERROR_TEXT
from bots.chat.splitting import split_message
from bots.chat.streaming import StreamedMessage

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # Discord's limit on message content, in characters
CLAIMED_MAX = 10_000  # message ids remembered as handled (catch-up and live delivery may overlap)
PRIVATELY_TEXT = "I've sent you the answer in a DM."
NO_DM_TEXT = "That answer is for you only, but I can't DM you: allow DMs from server members, or use the slash command."
NO_MENTIONS = discord.AllowedMentions.none()  # generated text must never ping anyone

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
                 defer_after: float = 2.0, stream_edit_seconds: float | None = None):
        self.bot = bot
        self.chat = chat
        self.store = store
        self.settings = settings              # the [discord] section of the config
        self.stopping = stopping
        self.defer_after = defer_after        # slash commands slower than this are deferred
        self.stream_edit_seconds = stream_edit_seconds  # None: replies are sent whole ([chat] stream = false)
        self._inflight: set[asyncio.Task] = set()
        self._claimed: collections.OrderedDict[int, None] = collections.OrderedDict()   # message ids taken

    def claim(self, message_id: int) -> bool:
        """True the first time a message id is seen: live delivery and catch-up may overlap."""
        if message_id in self._claimed:
            return False
        self._claimed[message_id] = None
        while len(self._claimed) > CLAIMED_MAX:
            self._claimed.popitem(last=False)
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
            await self.handle_message(message)
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
                    "discord", chat_id, thread_id=thread_id, type=chat_type, title=title)
                reply_to_bot = await self.store.messages.is_bot_message(db_chat, ref.message_id)
        answer_all = {str(c) for c in self.settings.answer_all_channels}
        return Incoming(
            platform="discord", chat_id=chat_id, user_id=str(message.author.id),
            text=text if kind == "text" else None, chat_type=chat_type, user_name=message.author.display_name,
            thread_id=thread_id, chat_title=title, message_id=str(message.id), reply_to_message_id=reply_to,
            mentions_bot=mentions_bot(message, me), reply_to_bot=reply_to_bot,
            answer_all=chat_id in answer_all or (thread_id != "" and thread_id in answer_all), kind=kind,
            sender_is_chat_admin=None if chat_type == "private" else member_is_admin(message.channel, message.author),
        )

    async def handle_message(self, message: discord.Message) -> None:
        msg = await self.incoming(message)
        quote = message if not msg.is_private else None  # in a DM the answer needs no quote
        stream = None
        if self.chat.will_generate(msg):
            if self.stream_edit_seconds is not None:
                stream = DiscordStream(message.channel, quote, self.stream_edit_seconds)
            async with typing(message.channel):
                outgoing = await self.chat.handle(msg, stream=stream)
        else:
            outgoing = await self.chat.handle(msg)
        for out in outgoing:
            if stream is not None and stream.started:
                await self.finish_stream(stream, out)
                stream = None
                continue
            if out.private and not msg.is_private:
                await self.send_privately(message, out)
            else:
                await self.send(message.channel, out, reply_to=quote)

    async def send_privately(self, message: discord.Message, out: Outgoing) -> None:
        """Admin output (and other answers for one person) asked for in a channel: to the
        author's DMs, with a short note in the channel."""
        try:
            dm = message.author.dm_channel or await message.author.create_dm()
            sent = await self.send(dm, out)
        except discord.HTTPException as exc:
            log.info("could not open a DM with %s: %s", message.author.id, exc)
            sent = []
        note = PRIVATELY_TEXT if sent else NO_DM_TEXT
        await self.send(message.channel, Outgoing(note), reply_to=message)

    async def finish_stream(self, stream: "DiscordStream", out: Outgoing) -> None:
        """The streamed message becomes the whole reply (or the apology); then it is marked
        delivered with the first message's id, or failed."""
        try:
            sent = await stream.finish(out.text)
        except discord.HTTPException as exc:
            log.warning("could not finish a streamed reply in Discord channel %s: %s",
                        getattr(stream.channel, "id", "?"), exc)
            await self.chat.failed(out)
            return
        await self.chat.delivered(out, str(sent[0].id))

    async def send(self, channel: discord.abc.Messageable, out: Outgoing, *,
                   reply_to: discord.Message | None = None) -> list[discord.Message]:
        """Send one Outgoing as one or more messages of at most 2000 characters, then mark
        it delivered (with the first message's id) or failed."""
        parts = split_message(out.text, MESSAGE_LIMIT) if out.text else []
        if not parts and out.image is None:
            await self.chat.failed(out)
            return []
        parts = parts or [None]
        sent: list[discord.Message] = []
        try:
            for i, part in enumerate(parts):
                kwargs = {"allowed_mentions": NO_MENTIONS}
                if i == 0 and reply_to is not None:
                    kwargs["reference"] = reply_to.to_reference(fail_if_not_exists=False)
                    kwargs["mention_author"] = False
                if i == len(parts) - 1 and out.image is not None:
                    kwargs["file"] = discord.File(out.image)
                sent.append(await channel.send(part, **kwargs))
        except discord.HTTPException as exc:
            log.warning("could not send a reply in Discord channel %s: %s", getattr(channel, "id", "?"), exc)
        if sent:
            await self.chat.delivered(out, str(sent[0].id))
        else:
            await self.chat.failed(out)
        return sent

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
            platform="discord", chat_id=chat_id, user_id=str(interaction.user.id),
            text=f"/{name} {args}".strip(), chat_type=chat_type, user_name=interaction.user.display_name,
            thread_id=thread_id, chat_title=title, mentions_bot=True, answer_all=chat_id in answer_all,
            sender_is_chat_admin=None if chat_type == "private" else _can_manage(interaction.permissions),
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
        parts = split_message(out.text, MESSAGE_LIMIT) or [None]
        first_id = None
        try:
            for i, part in enumerate(parts):
                kwargs = {"ephemeral": out.ephemeral, "allowed_mentions": NO_MENTIONS}
                if i == len(parts) - 1 and out.image is not None:
                    kwargs["file"] = discord.File(out.image)
                if not interaction.response.is_done():
                    await interaction.response.send_message(part, **kwargs)
                else:
                    sent = await interaction.followup.send(part, wait=True, **kwargs)
                    first_id = first_id or sent.id
        except discord.HTTPException as exc:
            log.warning("could not answer /%s: %s", interaction.command.name if interaction.command else "?", exc)
            await self.chat.failed(out)
            return
        await self.chat.delivered(out, str(first_id) if first_id else None)


class DiscordStream(StreamedMessage):
    """A reply shown while it is written: channel.send for the first words, then
    message.edit (PATCH) at most once per interval (bots/chat/streaming.py)."""

    def __init__(self, channel: discord.abc.Messageable, reply_to: discord.Message | None, interval_s: float):
        super().__init__(MESSAGE_LIMIT, interval_s)
        self.channel = channel
        self.reply_to = reply_to

    async def send_first(self, text: str) -> discord.Message:
        kwargs = {"allowed_mentions": NO_MENTIONS}
        if self.reply_to is not None:
            kwargs["reference"] = self.reply_to.to_reference(fail_if_not_exists=False)
            kwargs["mention_author"] = False
        return await self.channel.send(text, **kwargs)

    async def edit(self, message: discord.Message, text: str) -> None:
        await message.edit(content=text, allowed_mentions=NO_MENTIONS)

    async def send_more(self, text: str) -> discord.Message:
        return await self.channel.send(text, allowed_mentions=NO_MENTIONS)


@contextlib.asynccontextmanager
async def typing(channel: discord.abc.Messageable):
    """The typing indicator while the body runs (kept alive by discord.py every few
    seconds); a channel that refuses it does not stop the reply."""
    indicator = channel.typing()
    try:
        await indicator.__aenter__()
    except discord.HTTPException as exc:
        log.debug("no typing indicator in %s: %s", getattr(channel, "id", "?"), exc)
        yield
        return
    try:
        yield
    finally:
        await indicator.__aexit__(None, None, None)


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
