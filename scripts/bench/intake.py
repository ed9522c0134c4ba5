"""How long storing a burst of incoming messages takes: the storage part of what a chat waits for before the engine.

    PYTHONPATH=. python -m scripts.bench.intake [--messages 16] [--rounds 4]

A fresh SQLite database with the bot's schema and pragmas; `messages` chats each send one message at
the same moment, stored as `ChatService.log_user_message` stores it (the chat row, the redelivery
check, the user row, the message), once for chats seen for the first time and once for known ones.
Prints wall and CPU milliseconds per burst. Why it exists: a 16-chat burst's first words came
0.11-0.19 s after the updates through the bot, most of it this (docs/BENCHMARKS.md, fourteenth pass).
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path


async def run(messages: int, rounds: int) -> None:
    from storage.store import open_store

    with tempfile.TemporaryDirectory(prefix="mynah-intake-") as tmp:
        store = await open_store(str(Path(tmp) / "bench.sqlite3"))
        try:
            async def one(chat: int, message_id: int) -> None:
                chat_id = await store.chats.chat("telegram", chat, type="private")
                await store.messages.seen_message(chat_id, message_id)
                user_id = await store.chats.user("telegram", chat, name="someone")
                await store.messages.log_once(chat_id, "user", "hello there, how are you today?", user_id=user_id,
                                              platform_message_id=message_id, status="ok")

            for kind in ("new chats", "known chats"):
                for r in range(rounds):
                    base = 1000 * (r + 1) if kind == "new chats" else 1000
                    wall, cpu = time.perf_counter(), time.process_time()
                    await asyncio.gather(*[one(base + i, 10 * r + (kind == "known chats") * 5 + 1)
                                           for i in range(messages)])
                    print(f"{kind}: {messages} messages stored in {1e3 * (time.perf_counter() - wall):.1f} ms "
                          f"(CPU {1e3 * (time.process_time() - cpu):.1f} ms)")
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.rounds))


if __name__ == "__main__":
    main()
