"""Private Telegram chats show a reply while it is written as a message draft (Bot API 9.3
sendMessageDraft), and get the whole reply as one new message when it is done.

Why not edits, as in groups: an edit can only follow a sent message, and the last edit
has to wait out the edit interval (`[chat] stream_edit_seconds`, for flood limits), so the
finished reply appeared up to a second late. A draft shows the first words at once, and
the final reply is a plain sendMessage that waits for nothing. Draft updates keep the
same interval (every request of a bot shares Telegram's ~30/s budget, PTB's AIORateLimiter).

A draft that fails (an API error: an older server or client, a chat that has none) is not
retried: the stream falls back to a message and edits (bots/chat/streaming.py) from then on.
"""
from __future__ import annotations

import itertools
import logging

from bots.chat.delivery import SenderStream
from bots.platforms.redaction import redact

log = logging.getLogger(__name__)

_draft_ids = itertools.count(1)   # non-zero, unique within this process (Telegram wants them per chat)


class Draft:
    """What a stream shows while it is still a draft (not a message: it has no id)."""

    message_id = None


class DraftStream(SenderStream):
    def __init__(self, sender, quote, interval_s: float):
        super().__init__(sender, quote, interval_s)
        self.draft_id = next(_draft_ids)
        self.drafting = True          # False after a draft failed: a message and edits instead

    async def _draft(self, text: str) -> bool:
        try:
            await self.sender.draft(self.draft_id, text)
            return True
        except self.sender.send_errors as exc:
            log.info("telegram: a message draft failed (%s); showing the reply with edits instead", redact(exc))
            self.drafting = False
            return False

    async def send_first(self, text: str):
        if self.drafting and await self._draft(text):
            return Draft()
        return await super().send_first(text)

    async def edit(self, message, text: str) -> None:
        if not isinstance(message, Draft):
            await super().edit(message, text)
        elif not (self.drafting and await self._draft(text)):
            self.message = await super().send_first(text)  # fall back: the words so far as a message

    async def finish(self, text: str, buttons: bool = False) -> list:
        if not isinstance(self.message, Draft):
            return await super().finish(text, buttons)
        self.message = None  # nothing sent yet: a failure below leaves no message id behind
        parts, sent = self.split(text) or [text], []
        for i, part in enumerate(parts):
            sent.append(await self.sender.send_text(part, quote=self.quote if i == 0 else None, buttons=buttons and i == 0))
        self.message, self.shown = sent[0], parts[0]
        return sent
