"""`mynah run`: serve every platform whose token is in the environment, until a signal.

Tokens come only from the environment (each platform's spec names its variable), never
from config.toml, and are never logged. SIGINT/SIGTERM stop intake first, let in-flight
replies finish, then close the engine and the database.

The platforms are the ones registered under bots/platforms (bots/platforms/registry.py);
an adapter's module is imported only when its token is set, so no adapter imports this
module and a platform's client library is never loaded when that platform is not served.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from bots.app import Mynah
from bots.chat.events import PlatformStartError
from bots.platforms.base import Platform
from bots.platforms.redaction import register_token
from bots.platforms.registry import discover, served

log = logging.getLogger(__name__)


def make_adapter(platform: str, app: Mynah, token: str, environ=os.environ) -> Platform:
    spec = discover()[platform]
    extra = {kw: environ[var].strip() for var, kw in spec.environ_kwargs.items() if environ.get(var, "").strip()}
    return spec.load_adapter()(app, token, **extra)


def configured_platforms(environ=os.environ) -> dict[str, str]:
    """{platform: token} for every platform whose token is set; each token is registered
    for redaction before anything can log it."""
    found = {}
    for name, spec in served().items():
        token = environ.get(spec.token_var, "").strip()
        if token:
            register_token(token, f"<{spec.token_var}>", separator=spec.token_separator)
            found[name] = token
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
    if not platforms and not config.dashboard.enabled:
        log.error("no platform to serve: set %s in the environment (or use `mynah chat`)",
                  " and/or ".join(spec.token_var for spec in served().values()))
        return 2
    dashboard_error: tuple = ()  # bots.dashboard (aiohttp, ~20 MB of RSS) is imported only to serve one
    if config.dashboard.enabled:
        from bots.dashboard import DashboardError, check_dashboard

        dashboard_error = (DashboardError,)
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
        if config.dashboard.enabled:
            from bots.dashboard import start_dashboard

            dashboard = await start_dashboard(app, config, environ, platforms=list(platforms))
        if not platforms:   # the dashboard can be tried before any platform token exists
            log.warning("no platform configured (%s unset): serving the dashboard alone on %s",
                        " and ".join(spec.token_var for spec in served().values()), dashboard.url)
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
    except (PlatformStartError, *dashboard_error) as exc:
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
