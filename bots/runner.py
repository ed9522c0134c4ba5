"""`mynah run`: serve every platform whose token is in the environment, until a signal.

Tokens come only from the environment (TELEGRAM_BOT_TOKEN, DISCORD_BOT_TOKEN), never from
config.toml, and are never logged. SIGINT/SIGTERM stop intake first, let in-flight replies
finish, then close the engine and the database.

Platforms are chosen from a table (name -> token variable, module, class) and imported only
when their token is set, so no adapter imports this module and Discord's client is never
loaded for a Telegram-only bot.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
from dataclasses import dataclass

from bots.app import Mynah
from bots.chat.events import PlatformStartError
from bots.dashboard import DashboardError, check_dashboard, start_dashboard
from bots.platforms.base import Platform
from bots.platforms.redaction import register_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlatformEntry:
    token_var: str        # the environment variable that holds the token
    module: str           # where the adapter class lives
    cls: str
    token_separator: str | None = None   # a token's public prefix ends here (Telegram: "<bot id>:<secret>")


PLATFORMS: dict[str, PlatformEntry] = {
    "telegram": PlatformEntry("TELEGRAM_BOT_TOKEN", "bots.platforms.telegram.adapter", "TelegramAdapter", ":"),
    "discord": PlatformEntry("DISCORD_BOT_TOKEN", "bots.platforms.discord.adapter", "DiscordAdapter"),
}
PLATFORM_TOKENS = {name: entry.token_var for name, entry in PLATFORMS.items()}


def make_adapter(platform: str, app: Mynah, token: str, environ=os.environ) -> Platform:
    entry = PLATFORMS[platform]
    adapter_class = getattr(importlib.import_module(entry.module), entry.cls)
    if platform == "telegram":   # the same on every worker of a webhook; never in config.toml
        return adapter_class(app, token, webhook_secret=environ.get("TELEGRAM_WEBHOOK_SECRET") or None)
    return adapter_class(app, token)


def configured_platforms(environ=os.environ) -> dict[str, str]:
    """{platform: token} for every platform whose token is set; each token is registered
    for redaction before anything can log it."""
    found = {p: environ[e.token_var].strip() for p, e in PLATFORMS.items() if environ.get(e.token_var, "").strip()}
    for platform, token in found.items():
        entry = PLATFORMS[platform]
        register_token(token, f"<{entry.token_var}>", separator=entry.token_separator)
    return found


def _stop_on_signals(stop_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals
            pass


async def serve(config, *, environ=os.environ, stop_event: asyncio.Event | None = None) -> int:
    platforms = configured_platforms(environ)
    if not platforms:
        log.error("no platform to serve: set %s in the environment (or use `mynah chat`)",
                  " and/or ".join(PLATFORM_TOKENS.values()))
        return 2
    try:
        check_dashboard(config, environ)
    except DashboardError as exc:
        log.error("%s", exc)
        return 2
    stop_event = stop_event or asyncio.Event()
    _stop_on_signals(stop_event)
    app = await Mynah.open(config)
    started: list[Platform] = []
    dashboard = None
    fatal: list[str] = []

    def stop_for(platform: str):
        def on_fatal(reason: str) -> None:
            fatal.append(f"{platform}: {reason}")
            stop_event.set()
        return on_fatal

    try:
        dashboard = await start_dashboard(app, config, environ, platforms=list(platforms))
        for platform, token in platforms.items():
            adapter = make_adapter(platform, app, token, environ)
            adapter.on_fatal = stop_for(platform)
            await adapter.start()
            started.append(adapter)
            app.attach(adapter)
            if dashboard is not None:
                dashboard.platform_up(platform)
            log.info("%s is up", platform)
        await stop_event.wait()
        for reason in fatal:
            log.error("stopping because %s", reason)
        log.info("stopping: finishing replies in flight")
        return 1 if fatal else 0
    except (PlatformStartError, DashboardError) as exc:
        log.error("%s", exc)
        return 1
    finally:
        for adapter in reversed(started):
            try:
                await adapter.stop()
            except Exception:
                log.exception("error while stopping an adapter")
        if dashboard is not None:
            await dashboard.stop()
        await app.close()
        log.info("stopped cleanly")
