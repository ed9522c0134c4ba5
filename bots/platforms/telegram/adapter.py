"""Telegram: talk to Mynah through python-telegram-bot 22.x.

`TelegramAdapter(app, token)` turns each Telegram message into a platform-neutral
`Incoming`, lets `ChatService` decide what to say, and sends every `Outgoing` back:

* private chats answer every text message; groups and supergroups answer a @mention, a
  reply to one of the bot's messages or a command (or everything, for the chat types in
  `[telegram] answer_all_chat_types`); a forum topic is its own conversation;
* the commands of `bots.chat.commands` (admin ones only for admins, in their private
  chat) are registered with setMyCommands; `/cmd@otherbot` is left to the other bot;
* replies go out through the shared delivery routine (bots/chat/delivery.py: typing,
  streaming, splitting, private answers, delivered / failed); telegram/sender.py is the
  Bot API side of it (429s waited out, network errors retried, "typing…" every 4 s).

Delivery durability (telegram/delivery.py): an update is acknowledged to Telegram only
once the user's message is stored. Message -> Incoming lives in telegram/incoming.py.

The token never reaches a log line or an error message (bots/platforms/redaction.py).

Run it with `mynah run` and TELEGRAM_BOT_TOKEN in the environment; see docs/TELEGRAM.md.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from urllib.parse import urlsplit

from cachetools import LRUCache
from telegram import BotCommand, BotCommandScopeChat, Update
from telegram.error import Conflict, InvalidToken, TelegramError
from telegram.ext import (AIORateLimiter, Application, ApplicationBuilder, CommandHandler, ContextTypes,
                          MessageHandler, filters)
from telegram.request import HTTPXRequest

from bots.chat.commands import commands_for, parse_command
from bots.chat.delivery import Delivery
from bots.chat.events import Incoming, Outgoing, PlatformStartError
from bots.platforms.base import Platform
from bots.platforms.redaction import redact, register_token
from bots.platforms.telegram.admins import ChatAdmins
from bots.platforms.telegram.delivery import AckGatedBot, DeliveryTracker, TrackingUpdateProcessor
from bots.platforms.telegram.incoming import PLATFORM, to_incoming
from bots.platforms.telegram.sender import (NO_PRIVATE_CHAT_TEXT, PRIVATELY_TEXT, TEXT_LIMIT,  # noqa: F401 (tests)
                                            TelegramSender)
from bots.platforms.telegram.spec import SPEC
from bots.platforms.telegram import reactions, workers
from engine.serving.admission import AdmissionGate

log = logging.getLogger(__name__)

OFFICIAL_API = "https://api.telegram.org"
ALLOWED_UPDATES = [Update.MESSAGE, *reactions.UPDATES]   # + feedback; edits, channel posts etc. are not ours
TOKEN_LABEL = "<TELEGRAM_BOT_TOKEN>"
CHAT_ADMIN_TTL_S = 60.0                            # how long a getChatMember answer is trusted
CHATS_REMEMBERED = 10_000                          # per-chat entries kept (least recently used go first)


# ---- the adapter --------------------------------------------------------------------------

def api_urls(base_url: str) -> tuple[str, str, str]:
    """(server root, Bot API URL template, file URL template) for `[telegram] base_url`.

    base_url is the server root ("http://localhost:8081"); a trailing "/bot" is accepted too."""
    root = (base_url or OFFICIAL_API).strip().rstrip("/")
    if root.endswith("/bot"):
        root = root[: -len("/bot")]
    return root, root + "/bot{token}", root + "/file/bot{token}"


class TelegramAdapter(Platform):
    name = PLATFORM

    def __init__(self, app, token: str, *, poll_timeout: float = 30.0, ack_warn_every: float = 30.0,
                 send_attempts: int = 6, retry_delay: float = 1.0, max_concurrent_updates: int = 256,
                 newcomer_s: float = 60.0, webhook_secret: str | None = None):
        self.app = app
        self.chat = app.chat
        self.config = app.config.telegram
        stream = app.config.chat.stream_edit_seconds if app.config.chat.stream else None
        self.delivery = Delivery(app.chat, stream_edit_seconds=stream)
        self._token = (token or "").strip()
        self.webhook_secret = webhook_secret        # TELEGRAM_WEBHOOK_SECRET (several workers need it)
        register_token(self._token, TOKEN_LABEL, separator=":")   # the bot id before ':' is public
        self.poll_timeout = poll_timeout
        self.send_attempts = send_attempts
        self.retry_delay = retry_delay              # first back-off after a network error
        self.max_concurrent_updates = max_concurrent_updates
        self.tracker = DeliveryTracker(ack_warn_every)
        gate = getattr(getattr(app, "engine", None), "admission", None)   # a fetched burst is prefilled as one batch
        self.tracker.admission = gate if isinstance(gate, AdmissionGate) else None
        self.newcomer_s = newcomer_s                # a 409 this soon after starting: we are the second instance
        self.on_fatal = None                        # runner: called with the reason when we must stop
        self.conflict: str | None = None            # set once a 409 Conflict made this instance stop
        self._polling_since = 0.0
        self._webhook = None  # telegram/webhook.WebhookServer in webhook mode
        self.api_root, self._api_url, self._file_url = api_urls(self.config.base_url)
        self.application: Application | None = None
        self._requests: tuple[HTTPXRequest, ...] = ()
        # Per-chat memory, bounded so that a bot in 100,000 chats holds only the recent ones.
        self._newest: LRUCache[tuple[str, str], int] = LRUCache(CHATS_REMEMBERED)   # (chat, topic) -> newest id
        self.chat_admins = ChatAdmins(lambda: self.application.bot, size=CHATS_REMEMBERED, ttl_s=CHAT_ADMIN_TTL_S)
        self.errors: collections.deque[BaseException] = collections.deque(maxlen=100)  # latest handler errors

    # ---- lifecycle ------------------------------------------------------------------
    def build_application(self) -> Application:
        """The PTB Application: an ack-gated ExtBot behind AIORateLimiter, concurrent updates,
        handlers for commands, other commands, and everything else."""
        request = HTTPXRequest(connection_pool_size=64, read_timeout=15.0, write_timeout=15.0,
                               connect_timeout=10.0, pool_timeout=10.0)
        updates_request = HTTPXRequest(connection_pool_size=2, read_timeout=15.0, connect_timeout=10.0)
        self._requests = (request, updates_request)
        bot = AckGatedBot(
            token=self._token, base_url=self._api_url, base_file_url=self._file_url,
            request=request, get_updates_request=updates_request,
            rate_limiter=AIORateLimiter(max_retries=3), tracker=self.tracker,
        )
        application = (
            ApplicationBuilder()
            .bot(bot)
            .concurrent_updates(TrackingUpdateProcessor(self.max_concurrent_updates, self.tracker))
            .build()
        )
        only_new = filters.UpdateType.MESSAGE   # edited messages and channel posts are ignored
        commands = [c.name for c in commands_for(SPEC.optional_commands)]
        application.add_handler(CommandHandler(commands, self._on_message, filters=only_new))
        application.add_handler(MessageHandler(only_new & filters.COMMAND, self._on_other_command))
        application.add_handler(MessageHandler(only_new & ~filters.COMMAND, self._on_message))
        reactions.register(application, self)   # feedback: reactions and 👍/👎 buttons
        application.add_error_handler(self._on_error)
        return application

    async def start(self) -> None:
        """Sign in (getMe), register the commands, start polling (or the webhook)."""
        if not self._token:
            raise PlatformStartError("TELEGRAM_BOT_TOKEN is empty: get a token from @BotFather")
        if self.config.mode == "webhook" and not self.config.webhook_url:
            raise PlatformStartError('[telegram] mode = "webhook" needs webhook_url, the public HTTPS '
                                     "address Telegram should post updates to")
        scheduler_log = logging.getLogger("apscheduler")
        if scheduler_log.level == logging.NOTSET:   # unless configured: no INFO line per typing job
            scheduler_log.setLevel(logging.WARNING)
        application = self.build_application()
        try:
            await application.initialize()
        except InvalidToken:
            await self._close_requests()
            raise PlatformStartError(
                f"Telegram rejected the bot token in TELEGRAM_BOT_TOKEN (getMe at {self.api_root} answered "
                "Unauthorized). Copy the token again from @BotFather (/mybots -> API Token).") from None
        except TelegramError as exc:
            await self._close_requests()
            raise PlatformStartError(f"cannot reach the Telegram Bot API at {self.api_root}: {redact(exc)}") from None
        self.application = application
        bot = application.bot
        log.info("telegram: signed in as @%s (id %s) at %s", bot.username, bot.id, self.api_root)
        try:
            await self._register_commands()
            await application.start()
            if self.config.mode == "webhook":
                await self._start_webhook()
            else:
                await workers.take_poll(getattr(self.app, "cluster", None), PLATFORM)
                self._polling_since = asyncio.get_running_loop().time()
                await application.updater.start_polling(
                    timeout=self.poll_timeout, allowed_updates=ALLOWED_UPDATES,
                    drop_pending_updates=False, error_callback=self._on_polling_error)
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TelegramError):
                raise PlatformStartError(f"Telegram would not start: {redact(exc)}") from None
            raise
        log.info("telegram: %s", "webhook listening" if self.config.mode == "webhook" else "polling for updates")
        if self.config.mode == "webhook" and getattr(self.app, "cluster", None) is not None:
            # Several workers: a 'pending' reply may be another live worker's, mid-send. A dead
            # worker's are failed and answered again with the updates survivors take over.
            log.info("telegram: pending replies of dead workers are recovered with their updates, not at start")
        else:
            application.create_task(self._recover_pending(), name="telegram:recover-pending")

    async def _recover_pending(self) -> None:
        """Replies a crash left 'pending': resend the recent ones, mark the rest failed."""
        async def resend(chat_id: str, thread_id: str, out: Outgoing) -> None:
            await self.send(int(chat_id), out, thread_id=int(thread_id) if thread_id else None,
                            reply_to=int(out.reply_to) if out.reply_to else None)

        try:
            await self.chat.recover_pending(PLATFORM, resend)
        except Exception:
            log.exception("telegram: could not recover the replies left pending by the last run")

    async def stop(self) -> None:
        """Stop fetching updates, let running handlers finish their replies, shut down."""
        application = self.application
        if application is None:
            return
        self.tracker.close()                          # the last acknowledgement waits for nothing
        try:
            if self._webhook is not None:
                await self._webhook.stop()            # unstored updates got no 200: Telegram keeps them
                self._webhook = None
            if application.updater is not None and application.updater.running:
                await application.updater.stop()      # acknowledges what is stored, fetches no more
            if self.tracker.unstored:                 # storage is still down: give those back to Telegram
                log.warning("telegram: stopping with %d update(s) not stored; Telegram delivers them again "
                            "at the next start", self.tracker.unstored)
                self.chat.writes.abandon()
        finally:
            try:
                if application.running:
                    await application.stop()          # waits for handlers (and their replies)
            finally:
                await application.shutdown()
                self.application = None
        log.info("telegram: stopped")

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Until every update fetched so far is fully handled (tests, graceful tools)."""
        await self.tracker.wait_idle(timeout)

    async def _close_requests(self) -> None:
        for request in self._requests:
            try:
                await request.shutdown()
            except Exception:  # pragma: no cover - best effort on a failed start
                pass

    async def _start_webhook(self) -> None:
        url = self.config.webhook_url
        path = urlsplit(url).path.lstrip("/")
        # Telegram sends the secret back in a header and the server rejects any request
        # without it, so only Telegram can post updates to us (telegram/workers.py).
        cluster = getattr(self.app, "cluster", None)
        secret = workers.webhook_secret(self.webhook_secret, cluster)
        claims = None if cluster is None else workers.WebhookClaims(cluster, PLATFORM, self.application, self.tracker)
        # Our own server (telegram/webhook.py): it answers 200 only once the message is stored. Imported
        # here: its aiohttp is ~20 MB of a polling bot's RSS otherwise.
        from bots.platforms.telegram.webhook import WebhookServer

        server = WebhookServer(self.application, self.tracker, secret=secret, path=path,
                               listen=self.config.webhook_listen, port=self.config.webhook_port, claims=claims)
        try:
            await server.start()
        except OSError as exc:
            raise PlatformStartError(f"cannot listen for the Telegram webhook on {self.config.webhook_listen}:"
                                     f"{self.config.webhook_port}: {exc}") from None
        self._webhook = server
        await workers.register_webhook(self.application.bot, cluster, url, secret, ALLOWED_UPDATES)

    async def _register_commands(self) -> None:
        bot = self.application.bot
        everyone = [BotCommand(c.name, c.description) for c in commands_for(SPEC.optional_commands, admin=False)]
        admins = everyone + [BotCommand(c.name, c.description) for c in commands_for(SPEC.optional_commands, admin=True)]
        try:
            await bot.set_my_commands(everyone)
        except TelegramError as exc:
            log.warning("telegram: could not register the command list: %s", redact(exc))
        for admin in SPEC.admins(self.app.config) or ():
            try:
                await bot.set_my_commands(admins, scope=BotCommandScopeChat(int(admin)))
            except (TelegramError, ValueError) as exc:
                log.info("telegram: admin commands not shown to %s (they must /start the bot first): %s",
                         admin, redact(exc))

    # ---- incoming -------------------------------------------------------------------
    async def _on_other_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Commands the CommandHandler did not take: unknown ones, or ones for another bot."""
        message = update.message
        parsed = parse_command(message.text or "")
        if parsed is not None and parsed[2] and parsed[2].lower() != (context.bot.username or "").lower():
            return  # /cmd@otherbot
        await self._on_message(update, context)

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        incoming = to_incoming(message, self.application.bot, self.config.answer_all_chat_types)
        if incoming is None:
            return
        key = (incoming.chat_id, incoming.thread_id)
        self._newest[key] = max(self._newest.get(key, 0), message.message_id)
        await self.chat_admins.mark(incoming)
        await self.delivery.reply(incoming, self._sender_for(incoming),
                                  on_logged=lambda: self.tracker.stored(update.update_id))

    def _sender_for(self, msg: Incoming) -> TelegramSender:
        """The chat (or topic) a message came from; in a private chat the answer quotes the
        message only once newer ones came."""
        key = (msg.chat_id, msg.thread_id)
        newer = (lambda reply_to: self._newest.get(key) != int(reply_to)) if msg.is_private else None
        return TelegramSender(self, int(msg.chat_id), thread_id=int(msg.thread_id) if msg.thread_id else None,
                              user_id=int(msg.user_id), quote_private=newer)

    # ---- outgoing -------------------------------------------------------------------
    async def send(self, chat_id: int | str, out: Outgoing, *, thread_id: int | None = None,
                   reply_to: int | None = None) -> list[int]:
        """Send one Outgoing to a chat (bots/chat/delivery.py: split, marked delivered or
        failed); `reply_to` quotes that message. Returns the message ids sent."""
        if reply_to is not None:
            out = dataclasses.replace(out, reply_to=str(reply_to))
        sender = TelegramSender(self, int(chat_id), thread_id=thread_id)
        return [m.message_id for m in await self.delivery.send(sender, out)]

    async def notify(self, chat_id: str, out: Outgoing, thread_id: str = "") -> None:
        """Deliver something nobody just asked for (a retrain result) to a Telegram chat / topic."""
        if self.application is None:
            log.info("telegram is stopped; not delivered to chat %s: %s", chat_id, out.text)
            return
        await self.send(int(chat_id), out, thread_id=int(thread_id) if thread_id else None)

    # ---- errors ---------------------------------------------------------------------
    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        self.errors.append(context.error)
        where = f"update {update.update_id}" if isinstance(update, Update) else "a background task"
        log.error("telegram: handling %s failed: %s", where, redact(context.error), exc_info=context.error)

    def _on_polling_error(self, exc: TelegramError) -> None:
        if isinstance(exc, Conflict):
            self._on_conflict(exc)
            return
        log.warning("telegram: getUpdates failed (%s); retrying", redact(exc))

    def _on_conflict(self, exc: Conflict) -> None:
        """409: another process polls the same token. The newcomer (a conflict within
        `newcomer_s` of starting to poll) stops, so the bot never answers twice; the instance
        that was already running keeps going (its polls win once the newcomer is gone)."""
        age = asyncio.get_running_loop().time() - self._polling_since
        if age > self.newcomer_s or self.conflict is not None:
            log.warning("telegram: 409 Conflict: another instance started polling this bot token; "
                        "it should stop by itself (this one keeps serving)")
            return
        self.conflict = ("another instance is already polling this bot token (Telegram answered 409 Conflict); "
                         "this one stops so that nobody is answered twice. Stop the other one (or use "
                         "another token) and start again.")
        log.error("telegram: %s", self.conflict)
        self.application.create_task(self._stop_for_conflict(), name="telegram:conflict")

    async def _stop_for_conflict(self) -> None:
        if self.on_fatal is not None:
            self.on_fatal(self.conflict)          # the runner stops everything, cleanly
        elif self.application is not None and self.application.updater.running:
            await self.application.updater.stop()

