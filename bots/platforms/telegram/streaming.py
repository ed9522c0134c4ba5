"""A Telegram reply shown while it is written: sendMessage for the first words, then
editMessageText at most once per `[chat] stream_edit_seconds` (bots/chat/streaming.py).
The final edit and the further parts of a long reply go through the adapter's retry
loop (429s waited out, network errors retried); edits while streaming are best effort."""
from __future__ import annotations

from telegram import ReplyParameters
from telegram.error import BadRequest

from bots.chat.streaming import StreamedMessage


class TelegramStream(StreamedMessage):
    def __init__(self, adapter, chat_id: int, *, thread_id: int | None, reply_to: int | None, limit: int,
                 interval_s: float):
        super().__init__(limit, interval_s)
        self.adapter = adapter
        self.target = {"chat_id": chat_id, "message_thread_id": thread_id}
        self.reply_to = reply_to

    @property
    def bot(self):
        return self.adapter.application.bot

    async def send_first(self, text: str):
        quote = ReplyParameters(self.reply_to, allow_sending_without_reply=True) if self.reply_to else None
        message = await self.bot.send_message(**self.target, text=text, reply_parameters=quote)
        return message.message_id

    async def edit(self, message_id: int, text: str) -> None:
        try:
            await self.adapter._with_retries(self.bot.edit_message_text, {"chat_id": self.target["chat_id"]},
                                             message_id=message_id, text=text)
        except BadRequest as exc:
            if "not modified" not in str(exc).lower():   # the same text again is not an error
                raise

    async def send_more(self, text: str):
        message = await self.adapter._with_retries(self.bot.send_message, dict(self.target), text=text)
        return message.message_id
