"""Telegram's side of delivery (bots/chat/delivery.py): one chat or topic, through the Bot API.

Sends wait out 429s (PTB's AIORateLimiter, then `with_retries`, which also retries network
errors with back-off), follow a group that became a supergroup, and fall back to the chat
when a topic was deleted. "typing…" is resent every 4 s by the job queue while a reply is
written. A 4096-character limit in UTF-16 code units (how Telegram counts).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from telegram import ReplyParameters
from telegram.constants import ChatAction, MessageLimit
from telegram.error import BadRequest, ChatMigrated, NetworkError, RetryAfter, TelegramError, TimedOut

from bots.chat.delivery import Sender
from bots.chat.events import Outgoing
from bots.chat.splitting import utf16_len
from bots.platforms.redaction import redact
from bots.platforms.telegram import reactions

log = logging.getLogger(__name__)

TEXT_LIMIT = MessageLimit.MAX_TEXT_LENGTH          # 4096
CAPTION_LIMIT = MessageLimit.CAPTION_LENGTH        # 1024
TYPING_EVERY_S = 4.0                               # "typing…" shows for ~5 s
PRIVATELY_TEXT = "I've sent you the answer in a private chat."
NO_PRIVATE_CHAT_TEXT = ("That answer is for you only, but I can't message you privately yet: open a private chat "
                        "with me, press Start, then ask again.")


def _retry_seconds(exc: RetryAfter) -> float:
    value = getattr(exc, "_retry_after", None)  # a timedelta; the public property warns in 22.x
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value or 1)


async def with_retries(call, target: dict, *, attempts: int, delay: float, **kwargs):
    """call(**target, **kwargs), waiting out 429s (beyond what AIORateLimiter already
    retried) and retrying network errors with back-off; a group that became a
    supergroup is followed. Anything else (400, 403) fails at once."""
    why = "no attempt"
    for attempt in range(1, attempts + 1):
        try:
            return await call(**target, **kwargs)
        except ChatMigrated as exc:
            target["chat_id"] = exc.new_chat_id
            wait, why = 0.0, "the group became a supergroup"
        except BadRequest as exc:
            if target.get("message_thread_id") and "thread not found" in str(exc).lower():
                target["message_thread_id"] = None   # the topic was deleted: answer in the chat
                wait, why = 0.0, "the topic is gone"
            else:
                raise
        except RetryAfter as exc:
            wait, why = _retry_seconds(exc) + 0.1, "flood limit"
        except (TimedOut, NetworkError) as exc:   # BadRequest is a NetworkError: caught above
            wait, why = delay, f"network error: {redact(exc)}"
            delay = min(delay * 2, 30.0)
        if attempt == attempts:
            break
        log.info("telegram: send to chat %s attempt %d failed (%s); retrying in %.1f s",
                 target["chat_id"], attempt, why, wait)
        await asyncio.sleep(wait)
    raise NetworkError(f"gave up after {attempts} attempts ({why})")


class TelegramSender(Sender):
    limit = TEXT_LIMIT
    caption_limit = CAPTION_LIMIT
    send_errors = (TelegramError, OSError)
    privately_text = PRIVATELY_TEXT
    no_private_text = NO_PRIVATE_CHAT_TEXT

    def __init__(self, adapter, chat_id: int, *, thread_id: int | None = None, user_id: int | None = None,
                 quote_private=None):
        self.adapter = adapter
        self.target = {"chat_id": chat_id, "message_thread_id": thread_id}
        self.user_id = user_id               # the asker: their private chat has the same id
        self.quote_private = quote_private   # (reply_to) -> bool: quote in a private chat (newer messages came)

    @staticmethod
    def measure(text: str) -> int:
        return utf16_len(text)

    @property
    def bot(self):
        return self.adapter.application.bot

    async def _call(self, method, **kwargs):
        return await with_retries(method, self.target, attempts=self.adapter.send_attempts,
                                  delay=self.adapter.retry_delay, **kwargs)

    def quote(self, out: Outgoing):
        """The message answered: quoted in groups, and in private chats once newer messages came."""
        if out.reply_to is None:
            return None
        if self.quote_private is not None and not self.quote_private(out.reply_to):
            return None
        return ReplyParameters(int(out.reply_to), allow_sending_without_reply=True)

    async def send_text(self, text: str, *, quote=None, buttons: bool = False):
        markup = reactions.buttons_markup(self.adapter.app.feedback) if buttons else None
        return await self._call(self.bot.send_message, text=text, reply_parameters=quote, reply_markup=markup)

    async def send_image(self, image, caption, *, quote=None):
        with open(image, "rb") as picture:
            photo = picture.read()
        return await self._call(self.bot.send_photo, photo=photo, caption=caption, reply_parameters=quote)

    async def edit(self, message, text: str) -> None:
        try:
            await with_retries(self.bot.edit_message_text, {"chat_id": self.target["chat_id"]},
                               attempts=self.adapter.send_attempts, delay=self.adapter.retry_delay,
                               message_id=message.message_id, text=text)
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():   # the same text again is not an error
                raise

    def message_id(self, message) -> str | None:
        return None if message is None else str(message.message_id)

    async def private(self) -> Sender | None:
        return None if self.user_id is None else TelegramSender(self.adapter, self.user_id)

    @contextlib.asynccontextmanager
    async def typing(self):
        """"typing…" now and every TYPING_EVERY_S until the reply is written."""
        application = self.adapter.application
        chat_id, thread = self.target["chat_id"], self.target["message_thread_id"]
        application.create_task(self._send_typing())
        job = None
        if application.job_queue is not None:
            job = application.job_queue.run_repeating(self._typing_job, interval=TYPING_EVERY_S,
                                                      first=TYPING_EVERY_S, chat_id=chat_id, data=thread)
        try:
            yield
        finally:
            if job is not None:
                job.schedule_removal()

    async def _typing_job(self, context) -> None:
        await self._send_typing()

    async def _send_typing(self) -> None:
        try:
            await self.bot.send_chat_action(self.target["chat_id"], ChatAction.TYPING,
                                            message_thread_id=self.target["message_thread_id"])
        except TelegramError as exc:  # cosmetic: never worth a retry or an error
            log.debug("telegram: typing indicator for %s failed: %s", self.target["chat_id"], redact(exc))
        except AttributeError:  # the application was shut down meanwhile
            pass
