"""Console chat (GPT2-chitchat's interact.py, with memory).

Interactive on a terminal; when stdin is a pipe it prints exactly one reply line per input
line, so it can be scripted. History lives in SQLite under platform "console", so a
restarted chat remembers.
"""
from __future__ import annotations

import asyncio
import getpass
import sys

from bots.chat.events import Incoming

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


async def run_console(chat, *, session: str | None = None, stdin=None, stdout=None) -> None:
    """Chat until /quit or end of input."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    session = session or getpass.getuser()
    if interactive:
        print("Mynah console. /reset starts afresh, /help lists commands, /quit leaves.", file=stdout)
    while True:
        line = await _read_line(stdin, "you> " if interactive else None)
        if line is None or line.strip() in QUIT:
            break
        msg = Incoming(platform="console", chat_id=session, user_id=session, user_name=session, text=line)
        outgoing = await chat.handle(msg)
        for out in outgoing:
            await chat.delivered(out, None)
        texts = [out.text for out in outgoing] or ["(nothing to answer)"]
        if interactive:
            for text in texts:
                print(f"mynah> {text}", file=stdout)
        else:
            print(_one_line(" ".join(texts)), file=stdout, flush=True)
