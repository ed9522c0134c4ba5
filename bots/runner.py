"""`mynah run`: serve every platform whose token is in the environment, until a signal.

Tokens come only from the environment (TELEGRAM_BOT_TOKEN, DISCORD_BOT_TOKEN), never from
config.toml, and are never logged. SIGINT/SIGTERM stop intake first, let in-flight replies
finish, then close the engine and the database.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from bots.app import Mynah

log = logging.getLogger(__name__)

PLATFORM_TOKENS = {"telegram": "TELEGRAM_BOT_TOKEN", "discord": "DISCORD_BOT_TOKEN"}


class PlatformStartError(RuntimeError):
    """A platform could not start (bad token, missing intent…); the message says what to fix."""


def make_adapter(platform: str, app: Mynah, token: str):
    if platform == "telegram":
        from bots.platforms.telegram.adapter import TelegramAdapter

        return TelegramAdapter(app, token)
    from bots.platforms.discord.adapter import DiscordAdapter

    return DiscordAdapter(app, token)


def configured_platforms(environ=os.environ) -> dict[str, str]:
    return {p: environ[var].strip() for p, var in PLATFORM_TOKENS.items() if environ.get(var, "").strip()}


async def serve(config, *, environ=os.environ, stop_event: asyncio.Event | None = None) -> int:
    platforms = configured_platforms(environ)
    if not platforms:
        log.error("no platform to serve: set %s in the environment (or use `mynah chat`)",
                  " and/or ".join(PLATFORM_TOKENS.values()))
        return 2
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals
            pass
    app = await Mynah.open(config)
    started = []
    try:
        for platform, token in platforms.items():
            adapter = make_adapter(platform, app, token)
            await adapter.start()
            started.append(adapter)
            log.info("%s is up", platform)
        await stop_event.wait()
        log.info("stopping: finishing replies in flight")
        return 0
    except PlatformStartError as exc:
        log.error("%s", exc)
        return 1
    finally:
        for adapter in reversed(started):
            try:
                await adapter.stop()
            except Exception:
                log.exception("error while stopping an adapter")
        await app.close()
        log.info("stopped cleanly")
