"""Console chat (GPT2-chitchat's interact.py, with memory).

Interactive on a terminal; when stdin is a pipe it prints exactly one reply line per input
line, so it can be scripted (and piped replies give no implicit feedback: the next line is
the script's, not a reaction). History lives in SQLite under platform "console", so a
restarted chat remembers.
"""
from __future__ import annotations

import asyncio
import getpass
import sys

from bots.chat.delivery import Delivery, Sender
from bots.chat.events import Incoming, Outgoing
from bots.platforms.base import Platform
from bots.platforms.console.spec import SPEC

QUIT = {"/quit", "/exit"}


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def _read_line(stream, prompt: str | None) -> str | None:
    def read():
        if prompt is not None:
            sys.stdout.write(prompt)
            sys.stdout.flush()
        return stream.readline()

    line = await asyncio.to_thread(read)
    return None if line == "" else line.rstrip("\r\n")


class ConsoleSender(Sender):
    """The terminal: one "mynah>" line per answer, never split."""

    limit = 1 << 30
    caption_limit = 1 << 30

    def __init__(self, stdout):
        self.stdout = stdout

    async def send_text(self, text: str, *, quote=None, buttons: bool = False) -> str:
        print(f"mynah> {text}", file=self.stdout, flush=True)
        return text

    async def send_image(self, image, caption, *, quote=None) -> str:
        print(f"mynah> {caption or ''}\n(loss curve: {image})", file=self.stdout, flush=True)
        return str(image)

    def message_id(self, message) -> None:
        return None             # a terminal line has no id


class ConsolePlatform(Platform):
    """One person at a terminal (or a script at a pipe); `run()` chats until /quit or end of input."""

    name = SPEC.name

    def __init__(self, chat, *, session: str | None = None, stdin=None, stdout=None):
        self.chat = chat
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty()
        self.session = session or getpass.getuser()
        self.delivery = Delivery(chat)
        self._stopped = False

    async def start(self) -> None:
        self._stopped = False
        if self.interactive:
            print("Mynah console. /reset starts afresh, /help lists commands, /quit leaves.", file=self.stdout)

    async def stop(self) -> None:
        """Read no further line (the one being answered still is)."""
        self._stopped = True

    async def run(self) -> None:
        await self.start()
        while not self._stopped:
            line = await _read_line(self.stdin, "you> " if self.interactive else None)
            if line is None or line.strip() in QUIT:
                break
            msg = Incoming(platform=self.name, chat_id=self.session, user_id=self.session, user_name=self.session,
                           text=line)
            await self._answer(await self.chat.handle(msg))
        await self.stop()

    async def _answer(self, outgoing: list[Outgoing]) -> None:
        """Interactive: one "mynah>" line per reply. Piped: exactly one line per input line."""
        if self.interactive:
            if not outgoing:
                print("mynah> (nothing to answer)", file=self.stdout)
            for out in outgoing:
                await self.send(self.session, out)
            return
        for out in outgoing:
            await self.chat.delivered(out, None)
        await self._not_feedback(outgoing)
        texts = [out.text for out in outgoing] or ["(nothing to answer)"]
        print(_one_line(" ".join(texts)), file=self.stdout, flush=True)

    async def _not_feedback(self, outgoing: list[Outgoing]) -> None:
        """A pipe's next line is the script's, not a reaction to the reply: keep piped replies
        out of implicit feedback (a scripted "what?" is not a complaint)."""
        await self.chat.store.feedback.mark_scripted(out.stored_id for out in outgoing)

    async def send(self, target, out: Outgoing, **options) -> list[str]:
        return await self.delivery.send(ConsoleSender(self.stdout), out)

    async def notify(self, chat_id: str, out: Outgoing, thread_id: str = "") -> None:
        await self.send(chat_id, out)


async def run_console(chat, *, session: str | None = None, stdin=None, stdout=None) -> None:
    """Chat until /quit or end of input."""
    await ConsolePlatform(chat, session=session, stdin=stdin, stdout=stdout).run()
