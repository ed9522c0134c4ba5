"""`mynah chat`: talk to the bot in the terminal."""
from __future__ import annotations

import asyncio

NAME = "chat"
HELP = "chat with Mynah in the console (history kept in SQLite)"


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder or hub name (default: [model] path in config)")
    parser.add_argument("--session", help="console session name (default: your user name)")


def run(args) -> int:
    from bots.app import Mynah
    from bots.config import load_config
    from bots.platforms.console import run_console
    from engine.model import ModelLoadError
    from storage.db import StorageError

    config = load_config(args.config)

    async def main() -> None:
        app = await Mynah.open(config, model_path=args.model)
        try:
            await run_console(app.chat, session=args.session)
        finally:
            await app.close()

    try:
        asyncio.run(main())
    except (ModelLoadError, StorageError) as exc:
        print(f"mynah: {exc}")
        return 1
    return 0
