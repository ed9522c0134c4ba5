"""Showing a reply while it is written, the same way on every platform.

The first words go out as a new message; after that the message is edited as text
arrives, at most once per `interval_s` (flood limits on edits are what streaming bots
most often run into), and `finish()` makes it the whole reply: a
last edit (waiting out the interval if needed), then the rest of a long reply as further
messages, split as usual. While streaming, only what fits in the first message is shown.

`bots.chat.delivery.SenderStream` implements `send_first`, `edit` and `send_more` with a
platform's Sender. An edit that fails while streaming is skipped (the next one, or the
final one, catches up); the final edit is the sender's to retry. The reply is stored once,
complete, by ChatService after generation; `finish()` returns the messages sent, and the
delivery routine marks it delivered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from bots.chat.splitting import split_message

log = logging.getLogger(__name__)


class StreamedMessage:
    def __init__(self, limit: int, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.interval_s = interval_s
        self.clock = clock
        self.message = None           # the platform's message (or its id) once the first words are out
        self.shown = ""               # what that message shows now
        self.last_write: float | None = None
        self.edits = 0
        self.broken = False           # the first send failed: finish() sends the reply normally

    @property
    def started(self) -> bool:
        return self.message is not None

    # ---- what a platform provides --------------------------------------------------------
    async def send_first(self, text: str):
        """Send a new message with `text`; return it (or its id)."""
        raise NotImplementedError

    async def edit(self, message, text: str) -> None:
        raise NotImplementedError

    async def send_more(self, text: str):
        """A further message (the rest of a long reply); return it (or its id)."""
        raise NotImplementedError

    # ---- called by ChatService while the reply is written ----------------------------------
    async def show(self, text: str) -> None:
        """The reply so far: send it, or edit it in if the interval has passed."""
        if self.broken:
            return
        parts = self.split(text)
        head = parts[0] if parts else ""
        if not head.strip() or head == self.shown:
            return
        if self.message is None:
            try:
                self.message = await self.send_first(head)
            except Exception as exc:
                log.warning("streaming: the first words could not be sent (%s); the reply will come whole", exc)
                self.broken = True
                return
        elif self.clock() - self.last_write >= self.interval_s:
            try:
                await self.edit(self.message, head)
                self.edits += 1
            except Exception as exc:
                log.info("streaming: an edit failed (%s); the next one catches up", exc)
                return
        else:
            return
        self.shown = head
        self.last_write = self.clock()

    # ---- called by the adapter once the reply is complete -----------------------------------
    def split(self, text: str) -> list[str]:
        return split_message(text, self.limit)

    async def finish(self, text: str, buttons: bool = False) -> list:
        """Make the streamed message the whole `text`; returns every message sent or edited.

        buttons: the reply is stored (a platform that shows drafts sends it with its feedback buttons)."""
        parts = self.split(text) or [text]
        if parts[0] != self.shown:
            wait = self.interval_s - (self.clock() - self.last_write)
            if wait > 0:
                await asyncio.sleep(wait)
            await self.edit(self.message, parts[0])
            self.edits += 1
            self.shown = parts[0]
            self.last_write = self.clock()
        sent = [self.message]
        for part in parts[1:]:
            sent.append(await self.send_more(part))
        return sent


class ShownAfter:
    """A stream that shows nothing until `stored` (the task storing the pending reply row) is done.

    Storing the row first and only then asking the engine put one more committed write per chat
    before a burst's prefill (the engine admits a fetched burst together): measured through the
    bot, 16 streamed chats reached the engine 40-60 ms later than unstreamed ones. Now the row
    is written while the engine prefills, and a crash after the first words still finds it.
    A failed or dropped row (None: the message was forgotten) shows nothing; the caller awaits
    `stored` itself and raises or drops the reply."""

    def __init__(self, stream: StreamedMessage, stored: "asyncio.Future"):
        self.stream, self.stored = stream, stored

    async def show(self, text: str) -> None:
        try:
            held = await asyncio.shield(self.stored)
        except Exception:  # noqa: BLE001 - the caller awaits `stored` and raises it
            return
        if held is not None:
            await self.stream.show(text)

