"""Discord front end: Mynah as a discord.py `commands.Bot`.

What it does (the chat rules live in `bots.chat.service.ChatService`, shared with Telegram):

- DMs: every message is answered, with that DM's own context.
- Guild channels: answered on a mention, a reply to the bot, or a command; a thread keeps
  its own context. Channels listed in `[discord] answer_all_channels` answer everything.
- Slash commands (/reset, /forget, /optout, /optin, /help; admin: /retrain, /status,
  /rollback, /models), synced at startup to `[discord] command_guilds` or globally.
  Typed commands ("/reset" sent as a message) go through the same ChatService path.
- Replies show the typing indicator, are split at 2000 characters (never truncated) and
  never ping anyone: `allowed_mentions` is "none" for every message the bot sends.

Run it with `DISCORD_BOT_TOKEN=... mynah run` (see docs/DISCORD.md for the Developer
Portal steps). `start()` returns once the bot is connected and ready, with the client
running as a background task; reconnects are left to discord.py, with its wait between
attempts capped at 32 s (backoff.py). A bad token or a missing
Message Content intent raises `PlatformStartError` with what to fix. The token is never
logged, and never part of an error message (bots/platforms/redaction.py).
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from bots.platforms.discord.quiet import silence_voice_warnings

silence_voice_warnings()   # before discord.py's voice module warns

import discord  # noqa: E402
from discord.ext import commands  # noqa: E402

from bots.chat.events import Outgoing, PlatformStartError
from bots.platforms.base import Platform
from bots.platforms.discord.backoff import bound_reconnect_waits
from bots.platforms.discord.catchup import catch_up
from bots.platforms.discord.cog import NO_MENTIONS, ChatCog
from bots.platforms.discord.reactions import FeedbackCog
from bots.platforms.discord.slash import slash_commands
from bots.platforms.discord.spec import SPEC
from bots.platforms.discord.workers import SharedClaims
from bots.platforms.redaction import redact, register_token

bound_reconnect_waits()

log = logging.getLogger(__name__)

PORTAL = "https://discord.com/developers/applications"
TOKEN_LABEL = "<DISCORD_BOT_TOKEN>"


def required_intents() -> discord.Intents:
    """Exactly what Mynah needs: guilds (channels, threads), guild and DM messages, and
    the privileged Message Content intent (enable it in the Developer Portal)."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    intents.guild_reactions = intents.dm_reactions = True   # feedback (bots/platforms/discord/reactions.py)
    return intents


class MynahBot(commands.Bot):
    """The discord.py client: no prefix commands of its own; the cog does the work."""

    def __init__(self, adapter: "DiscordAdapter", **options):
        options.setdefault("intents", adapter.intents)
        super().__init__(command_prefix=commands.when_mentioned, help_command=None,
                         allowed_mentions=NO_MENTIONS, **options)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        await self.install()
        await self.sync_commands()

    async def install(self) -> ChatCog:
        """Add the chat cog and the slash commands of the command table (not synced yet)."""
        cog = self.adapter.make_cog(self)
        await self.add_cog(cog)
        await self.add_cog(FeedbackCog(self, self.adapter.app.feedback))
        for command in slash_commands(cog.run_command):
            self.tree.add_command(command)
        return cog

    async def sync_commands(self) -> None:
        """Register the slash commands: in the configured guilds (instant) or globally
        (Discord may take a while to show new global commands)."""
        guild_ids = [int(g) for g in self.adapter.app.config.discord.command_guilds]
        try:
            if guild_ids:
                for guild_id in guild_ids:
                    guild = discord.Object(id=guild_id)
                    self.tree.copy_global_to(guild=guild)
                    synced = await self.tree.sync(guild=guild)
                    log.info("synced %d slash commands to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("synced %d slash commands globally", len(synced))
        except discord.Forbidden as exc:
            log.warning("could not sync slash commands (%s): invite the bot with the applications.commands "
                        "scope (see docs/DISCORD.md); typed commands like /reset still work", exc.text or exc.status)
        except discord.HTTPException as exc:
            log.warning("could not sync slash commands: %s; typed commands like /reset still work", exc)

    async def on_message(self, message: discord.Message, /) -> None:
        """No ext.commands prefix commands: the cog sends every message, typed commands
        like "/reset" included, through ChatService (so nothing here to process)."""

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (id %s) in %d servers", self.user, self.user.id if self.user else "?",
                 len(self.guilds))
        self.adapter.ready.set()
        self.adapter.on_session()


class ShardedMynahBot(MynahBot, commands.AutoShardedBot):
    """MynahBot over several gateway connections (discord.py's AutoShardedBot): needed from
    2,500 guilds on, and useful well before. `[discord] shards = "auto"` asks Discord for its
    recommended count (GET /gateway/bot); a number fixes it. The cog and commands are the
    same: discord.py routes each guild's events through its shard."""


def bot_class(shards, shard_ids=()) -> tuple[type, dict]:
    """(client class, its extra options) for `[discord] shards` and `shard_ids` (this
    worker's share of the shards when several workers run the same bot)."""
    if shards == "auto":
        return ShardedMynahBot, {}
    if shard_ids:
        return ShardedMynahBot, {"shard_count": int(shards), "shard_ids": sorted(shard_ids)}
    if int(shards) > 1:
        return ShardedMynahBot, {"shard_count": int(shards)}
    return MynahBot, {}


class DiscordAdapter(Platform):
    """One Discord bot serving a shared `Mynah` app; see the module docstring."""

    name = SPEC.name

    def __init__(self, app, token: str, *, intents: discord.Intents | None = None, ready_timeout: float = 180.0,
                 defer_after: float = 2.0, drain_timeout: float = 30.0, **bot_options):
        self.app = app
        self._token = (token or "").strip()
        register_token(self._token, TOKEN_LABEL)
        self.intents = intents or required_intents()
        self.ready_timeout = ready_timeout    # start() gives up if Discord is not ready by then
        self.defer_after = defer_after        # slash commands slower than this are deferred (handed to the cog)
        self.drain_timeout = drain_timeout    # stop() waits this long for replies in flight
        self.bot_options = bot_options        # extra commands.Bot options (e.g. guild_ready_timeout)
        self.bot: MynahBot | None = None
        self.ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._session_task: asyncio.Task | None = None
        self._recovered = False         # replies left pending by the last run: dealt with once

    def __repr__(self) -> str:  # never show the token
        return f"<DiscordAdapter ready={self.ready.is_set()}>"

    @property
    def chat(self):
        return self.app.chat

    def build_bot(self) -> MynahBot:
        """A fresh client (tests drive it with dpytest without calling start())."""
        settings = self.app.config.discord
        cls, options = bot_class(settings.shards, settings.shard_ids)
        if cls is ShardedMynahBot:
            log.info("discord: sharded client (%s shards%s)", options.get("shard_count", "auto: Discord's recommended"),
                     f", this worker runs {options['shard_ids']}" if "shard_ids" in options else "")
        self.bot = cls(self, **{**options, **self.bot_options})
        return self.bot

    def make_cog(self, bot: commands.Bot) -> ChatCog:
        """The cog, given what it needs (it knows nothing of this adapter)."""
        app = self.app
        return ChatCog(bot, app.chat, app.store, app.config.discord, stopping=lambda: self._stopping,
                       defer_after=self.defer_after, shared=SharedClaims(app.cluster) if getattr(app, "cluster", None) else None,
                       stream_edit_seconds=app.config.chat.stream_edit_seconds if app.config.chat.stream else None)

    @property
    def cog(self) -> ChatCog | None:
        return self.bot.get_cog(ChatCog.__cog_name__) if self.bot else None

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Log in, sync commands, connect; return once Discord says we are ready."""
        if not self._token:
            raise PlatformStartError(f"DISCORD_BOT_TOKEN is empty: copy the bot token from {PORTAL} -> "
                                     "your application -> Bot")
        bot = self.build_bot()
        self.ready.clear()
        self._task = asyncio.create_task(bot.start(self._token), name="mynah-discord")
        ready = asyncio.create_task(self.ready.wait())
        try:
            await asyncio.wait({self._task, ready}, timeout=self.ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self.ready.is_set() and not self._task.done():
            self._task.add_done_callback(self._client_exited)
            return
        if self._task.done():
            error = self._start_error(self._task.exception() if not self._task.cancelled() else None)
        else:
            error = PlatformStartError(f"Discord did not become ready within {self.ready_timeout:.0f} s; "
                                       "check the network connection to discord.com")
        await self._close_client()
        raise error

    async def send(self, target: discord.abc.Messageable, out: Outgoing, *,
                   reply_to: discord.Message | None = None) -> list[discord.Message]:
        """Send one Outgoing to a channel, thread or DM (split at 2000 characters)."""
        if self.cog is None:
            raise RuntimeError("the Discord bot is not set up: start() first")
        return await self.cog.send(target, out, reply_to=reply_to)

    async def notify(self, chat_id: str, out: Outgoing, thread_id: str = "") -> None:
        """Deliver something nobody just asked for (a retrain result) to a channel or thread."""
        if self.bot is None or self.bot.is_closed() or self.cog is None:
            log.info("discord is stopped; not delivered to channel %s: %s", chat_id, out.text)
            return
        target = int(thread_id or chat_id)
        channel = self.bot.get_channel(target) or await self.bot.fetch_channel(target)
        await self.send(channel, out)

    # ---- after (re)connecting ----------------------------------------------------------
    def on_session(self) -> None:
        """A fresh gateway session (start-up, or a resume that failed): the gateway will not
        replay what this bot missed, so resend the replies a crash left pending (once) and
        catch up on the channel histories (bots/platforms/discord/catchup.py)."""
        if self._session_task is not None and not self._session_task.done():
            return
        self._session_task = asyncio.create_task(self._after_connect(), name="mynah-discord-catch-up")

    async def _after_connect(self) -> None:
        try:
            if not self._recovered:
                self._recovered = True
                await self.chat.recover_pending(SPEC.name, self._resend)
            await catch_up(self.bot, self.cog, self.app.store.messages, self.app.config.discord.catch_up_minutes)
        except Exception:
            log.exception("discord: catching up after connecting failed")

    async def _resend(self, chat_id: str, thread_id: str, out: Outgoing) -> None:
        target = int(thread_id or chat_id)
        channel = self.bot.get_channel(target) or await self.bot.fetch_channel(target)
        quote = None
        if out.reply_to and getattr(channel, "guild", None) is not None:
            quote = channel.get_partial_message(int(out.reply_to))
        await self.send(channel, out, reply_to=quote)

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Until the work after the latest connect is done (tests)."""
        if self._session_task is not None:
            await asyncio.wait_for(asyncio.shield(self._session_task), timeout)

    async def stop(self) -> None:
        """Stop taking messages, let replies in flight finish, then disconnect."""
        self._stopping = True
        if self._session_task is not None and not self._session_task.done():
            self._session_task.cancel()
        cog = self.cog
        if cog is not None:
            await cog.drain(self.drain_timeout)
        await self._close_client()

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _close_client(self) -> None:
        if self.bot is not None and not self.bot.is_closed():
            await self.bot.close()
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
            except Exception:  # already reported by _client_exited or start()
                pass

    def _client_exited(self, task: asyncio.Task) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("the Discord client stopped: %s", self._start_error(exc))
        else:
            log.error("the Discord client stopped unexpectedly; Discord messages are no longer served")

    def _start_error(self, exc: BaseException | None) -> PlatformStartError:
        if isinstance(exc, discord.LoginFailure) or (
                isinstance(exc, discord.ConnectionClosed) and exc.code == 4004):
            text = ("Discord rejected the bot token: DISCORD_BOT_TOKEN is wrong or was reset. Copy a fresh one from "
                    f"{PORTAL} -> your application -> Bot -> Reset Token.")
        elif isinstance(exc, discord.PrivilegedIntentsRequired):
            text = ("Discord refused the connection because the Message Content intent is not enabled. Turn it on at "
                    f"{PORTAL} -> your application -> Bot -> Privileged Gateway Intents -> Message Content Intent, "
                    "then start Mynah again.")
        elif isinstance(exc, (discord.HTTPException, aiohttp.ClientError, OSError, asyncio.TimeoutError)):
            text = f"could not connect to Discord: {type(exc).__name__}: {exc}"
        elif exc is None:
            text = "the Discord client stopped before it was ready"
        else:
            text = f"Discord failed to start: {type(exc).__name__}: {exc}"
        error = PlatformStartError(redact(text))
        error.__cause__ = None
        return error
