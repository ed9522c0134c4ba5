"""Getting what ChatService says to the asker, the same way on every platform.

An adapter only translates its platform's events into `Incoming` and wraps its API in a
`Sender` (send a text part, send a picture, edit, show "typing…", open the asker's private
chat). Everything else happens here, once: splitting to the platform's limit, showing a
reply while it is written (`[chat] stream`), sending answers meant for one person to their
private chat (`answers_privately`), and marking each stored reply delivered or failed.

Partial sends are handled one way: a reply counts as delivered only when every part went
out. A reply whose later parts failed is marked failed (the first part's id is kept, so a
reply to it still counts as a reply to the bot): the user never saw all of it, so it is
neither context for the next reply nor training data, and it is not resent (the parts
that did arrive would be shown twice).
"""
from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from bots.chat.events import Incoming, Outgoing, answers_privately
from bots.chat.splitting import split_message
from bots.chat.streaming import StreamedMessage

log = logging.getLogger(__name__)


class Sender(ABC):
    """One conversation (chat, channel, thread or DM) on one platform, as delivery sees it."""

    limit: int                                   # a message's length limit, as `measure` counts
    caption_limit: int = 0                       # a picture's caption limit (0: pictures get no caption)
    send_errors: tuple[type[BaseException], ...] = (OSError,)   # a send that raises these failed
    privately_text = "I've sent you the answer privately."
    no_private_text = "That answer is for you only, but I can't message you privately."

    @staticmethod
    def measure(text: str) -> int:
        return len(text)

    @abstractmethod
    async def send_text(self, text: str, *, quote: Any = None, buttons: bool = False) -> Any:
        """Send one part; returns the platform's message. `buttons`: feedback buttons, where
        the platform has them (the first part of a stored reply)."""

    async def send_image(self, image: Path, caption: str | None, *, quote: Any = None) -> Any:
        raise NotImplementedError(f"{type(self).__name__} cannot send pictures")

    async def edit(self, message: Any, text: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot edit a message")

    def message_id(self, message: Any) -> str | None:
        return None if message is None else str(getattr(message, "id", message))

    def quote(self, out: Outgoing) -> Any:
        """What the first part of `out` quotes (None: nothing)."""
        return None

    def typing(self) -> contextlib.AbstractAsyncContextManager:
        """Show "typing…" while the body runs (cosmetic: never fails the reply)."""
        return contextlib.nullcontext()

    async def private(self) -> Sender | None:
        """The asker's private chat, or None when they cannot be reached there."""
        return None


class SenderStream(StreamedMessage):
    """A reply shown while it is written, through a Sender (bots/chat/streaming.py)."""

    def __init__(self, sender: Sender, quote: Any, interval_s: float):
        super().__init__(sender.limit, interval_s)
        self.sender = sender
        self.quote = quote

    async def send_first(self, text: str):
        return await self.sender.send_text(text, quote=self.quote)

    async def edit(self, message, text: str) -> None:
        await self.sender.edit(message, text)

    async def send_more(self, text: str):
        return await self.sender.send_text(text)


class Delivery:
    """Sends every answer through a Sender and reports it to `chat` (delivered / failed)."""

    def __init__(self, chat, *, stream_edit_seconds: float | None = None):
        self.chat = chat                              # ChatService: handle, will_generate, delivered, failed
        self.stream_edit_seconds = stream_edit_seconds   # None: replies are sent whole

    async def reply(self, msg: Incoming, sender: Sender, *, on_logged=None) -> None:
        """Answer one incoming message: typing while the engine writes (streamed when on),
        then every answer sent and marked."""
        stream = None
        if self.chat.will_generate(msg):
            if self.stream_edit_seconds is not None:
                stream = SenderStream(sender, sender.quote(Outgoing("", reply_to=msg.message_id)),
                                      self.stream_edit_seconds)
            async with sender.typing():
                outgoing = await self.chat.handle(msg, on_logged=on_logged, stream=stream)
        else:
            outgoing = await self.chat.handle(msg, on_logged=on_logged)
        await self.answer(msg, outgoing, sender, stream)

    async def answer(self, msg: Incoming, outgoing: list[Outgoing], sender: Sender,
                     stream: SenderStream | None = None) -> None:
        for out in outgoing:
            if stream is not None and stream.started:
                await self.finish_stream(stream, out)
                stream = None
            elif out.private and answers_privately(msg):
                await self.send_privately(msg, sender, out)
            else:
                await self.send(sender, out)

    async def send(self, sender: Sender, out: Outgoing) -> list:
        """Send one Outgoing (a picture first if it has one, then the text split to the
        platform's limit) and mark it. Returns the messages sent."""
        parts = split_message(out.text, sender.limit, sender.measure) if out.text else []
        sent: list = []
        quote = sender.quote(out)
        try:
            if out.image is not None:
                fits = len(parts) == 1 and sender.measure(parts[0]) <= sender.caption_limit
                sent.append(await sender.send_image(out.image, parts.pop(0) if fits else None, quote=quote))
                quote = None
            for part in parts:
                sent.append(await sender.send_text(part, quote=quote, buttons=out.stored_id is not None and not sent))
                quote = None
        except sender.send_errors as exc:
            log.warning("a reply failed for good after %d of its part(s) went out: %s", len(sent), exc)
            await self.chat.failed(out, sender.message_id(sent[0]) if sent else None)
            return sent
        if not sent:
            log.warning("nothing to send (an empty reply)")
            await self.chat.failed(out)
        else:
            await self.chat.delivered(out, next((i for i in map(sender.message_id, sent) if i), None))
        return sent

    async def send_privately(self, msg: Incoming, sender: Sender, out: Outgoing) -> None:
        """To the asker's private chat, with a short note where they asked (or how to make
        that possible)."""
        try:
            private = await sender.private()
        except sender.send_errors as exc:
            log.info("could not open a private chat with the asker: %s", exc)
            private = None
        sent = await self.send(private, out) if private is not None else []
        if private is None:
            await self.chat.failed(out)
        note = sender.privately_text if sent else sender.no_private_text
        await self.send(sender, Outgoing(note, reply_to=msg.message_id))

    async def finish_stream(self, stream: SenderStream, out: Outgoing) -> None:
        """The streamed message becomes the whole reply (or the apology, if generation failed
        after the first words); marked delivered with the first message's id, or failed."""
        try:
            sent = await stream.finish(out.text)
        except stream.sender.send_errors as exc:
            log.warning("a streamed reply could not be finished: %s", exc)
            await self.chat.failed(out, stream.sender.message_id(stream.message))
            return
        await self.chat.delivered(out, stream.sender.message_id(sent[0]))
