"""`mynah run`: serve Telegram and/or Discord (tokens from the environment)."""
from __future__ import annotations

import asyncio

NAME = "run"
HELP = "serve every platform whose token is set (TELEGRAM_BOT_TOKEN, DISCORD_BOT_TOKEN)"


def add_arguments(parser) -> None:
    pass


def run(args) -> int:
    from bots.config import load_config
    from bots.runner import serve
    from engine.model import ModelLoadError
    from engine.serving.quantize import limit_malloc_arenas
    from storage.db import StorageError

    limit_malloc_arenas(1)  # before any thread starts: the worker reuses what the model load freed

    config = load_config(args.config)
    try:
        return asyncio.run(serve(config))
    except (ModelLoadError, StorageError) as exc:
        print(f"mynah: {exc}")
        return 1
