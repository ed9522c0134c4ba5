"""Start and stop the dashboard inside the bot's own event loop (one aiohttp site, one port).

    check_dashboard(config, os.environ)                       # early: DashboardError without a token
    handle = await start_dashboard(app, config, os.environ, platforms=[name, …])  # None when disabled
    handle.platform_up(name)                                  # after each platform started
    await handle.stop()
"""
from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass

from aiohttp import web

from bots.dashboard.auth import Auth, DashboardError, read_token
from bots.dashboard.progress import Progress
from bots.dashboard.routes import STATE, DashboardState, add_routes

log = logging.getLogger(__name__)
access_log = logging.getLogger("bots.dashboard.access")


@dataclass
class DashboardHandle:
    runner: web.AppRunner
    state: DashboardState
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def platform_up(self, name: str, up: bool = True) -> None:
        """Tell the Overview (and mynah_platform_up) that a platform connected or went away."""
        self.state.platforms[name] = "up" if up else "down"

    async def stop(self) -> None:
        self.state.progress.active = False
        await self.runner.cleanup()
        log.info("dashboard stopped")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_webapp(state: DashboardState) -> web.Application:
    webapp = web.Application(middlewares=[state.auth.middleware()], client_max_size=64 * 1024)
    webapp[STATE] = state
    add_routes(webapp)
    return webapp


def check_dashboard(config, environ=os.environ) -> None:
    """Raise DashboardError now (before a model loads) when the dashboard is enabled without a usable token."""
    if config.dashboard.enabled:
        read_token(environ)


async def start_dashboard(app, config=None, environ=os.environ, *, platforms=()) -> DashboardHandle | None:
    """Serve the dashboard for `app` (a bots.app.Mynah) when [dashboard] enabled = true.

    `platforms` are the names about to start (shown as "starting" until `platform_up`).
    Raises DashboardError (with what to fix) when it is enabled but MYNAH_DASHBOARD_TOKEN is
    missing or too short, or when the address cannot be bound."""
    config = config or app.config
    dc = config.dashboard
    if not dc.enabled:
        return None
    token = read_token(environ)
    try:  # scrub it from every log line too, should a library ever print it
        from bots.platforms.redaction import register_secret

        register_secret(token, "<MYNAH_DASHBOARD_TOKEN>")
    except ImportError:
        pass
    state = DashboardState(app=app, config=dc, auth=Auth(token, metrics_public=_is_loopback(dc.listen)),
                           progress=Progress(),
                           platforms={name: "starting" for name in platforms}, started_at=time.time())
    if app.learning is not None:
        app.learning.add_progress_listener(state.progress)
    runner = web.AppRunner(build_webapp(state), access_log=access_log, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, dc.listen, dc.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise DashboardError(f"the dashboard cannot listen on {dc.listen}:{dc.port}: {exc.strerror or exc}") from None
    host, port = runner.addresses[0][:2]
    handle = DashboardHandle(runner, state, host, port)
    log.info("dashboard on %s", handle.url)
    if not _is_loopback(dc.listen):
        log.warning("the dashboard listens on %s, beyond this machine: put it behind a TLS proxy or a firewall "
                    "(/metrics needs the token there too: Prometheus's bearer_token)", dc.listen)
    return handle


async def stop(handle: DashboardHandle | None) -> None:
    """Stop a dashboard started by start_dashboard (None: nothing to do)."""
    if handle is not None:
        await handle.stop()
