"""The dashboard's pages, actions and JSON endpoints (auth is the middleware's job, see auth.py).

Actions (rollback, retrain) are POSTs; they answer JSON to a script (Accept: application/json)
and otherwise leave a note in the session and redirect back to their page (303). Each one is
written to admin_audit as platform "dashboard", like an admin command from a chat.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from bots import metrics
import bots.dashboard.assets as assets
import bots.dashboard.pages as pages
import bots.dashboard.queries as queries
from bots.dashboard.auth import SESSION, Auth, safe_next, wants_json
from bots.dashboard.charts import BUCKET_S, traffic_png
from bots.dashboard.feedback import canary_summary, feedback_section
from bots.dashboard.progress import Progress

log = logging.getLogger(__name__)

VERSION_NAME = re.compile(r"v\d{4,}")
CHART_TTL_S = 30.0


@dataclass
class DashboardState:
    app: object                    # bots.app.Mynah
    config: object                 # bots.config.DashboardConfig
    auth: Auth
    progress: Progress
    platforms: dict = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    chart: tuple[float, bytes] | None = None
    stored: metrics.StoredReplies = field(default_factory=metrics.StoredReplies)   # /metrics' tally


STATE = web.AppKey("mynah_dashboard", DashboardState)


def state_of(request: web.Request) -> DashboardState:
    return request.app[STATE]


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def context(request: web.Request) -> dict:
    """csrf and flash notes for a page (a bearer client has neither)."""
    session = request.get(SESSION)
    if session is None:
        return {"csrf": "", "flash": []}
    notes, session.flash[:] = list(session.flash), []
    return {"csrf": session.csrf, "flash": notes}


def done(request: web.Request, location: str, message: str, *, ok: bool = True) -> web.Response:
    if wants_json(request):
        return web.json_response({"ok": ok, "message": message}, status=200 if ok else 409)
    session = request.get(SESSION)
    if session is not None:
        session.flash.append(message)
    return web.Response(status=303, headers={"Location": location})


async def audit(request: web.Request, command: str, args: str | None) -> None:
    try:
        await state_of(request).app.store.audit.record("dashboard", request.remote or "?", command, args, True)
    except Exception:
        log.exception("could not audit the dashboard's %s", command)


# ---------------------------------------------------------------------------- login

async def login_form(request: web.Request) -> web.Response:
    target = safe_next(request.query.get("next"))
    if state_of(request).auth.session(request) is not None:
        return web.Response(status=303, headers={"Location": target})
    return html(pages.login_page(target))


async def login(request: web.Request) -> web.Response:
    auth = state_of(request).auth
    client = request.remote or "?"
    if not auth.same_origin(request):
        return html(pages.login_page("/", "Cross-site login refused."), 403)
    if not auth.login_allowed(client):
        return html(pages.login_page("/", "Too many wrong tokens; wait a minute."), 429)
    form = await request.post()
    target = safe_next(form.get("next") if isinstance(form.get("next"), str) else None)
    if not auth.token_ok(form.get("token") if isinstance(form.get("token"), str) else ""):
        auth.login_failed(client)
        return html(pages.login_page(target, "That is not the token."), 401)
    sid, _ = auth.new_session()
    response = web.Response(status=303, headers={"Location": target})
    auth.set_cookie(response, request, sid)
    log.info("dashboard: login from %s", client)
    return response


async def logout(request: web.Request) -> web.Response:
    state_of(request).auth.end_session(request)
    response = web.Response(status=303, headers={"Location": "/login"})
    response.del_cookie("mynah_session", path="/")
    return response


# ---------------------------------------------------------------------------- overview

async def overview(request: web.Request) -> web.Response:
    ov = await queries.overview(state_of(request))
    return html(pages.overview_page(ov, **context(request)))


async def overview_json(request: web.Request) -> web.Response:
    ov = await queries.overview(state_of(request))
    return web.json_response({**ov.to_json(), "display": pages.overview_display(ov)})


async def traffic_chart(request: web.Request) -> web.Response:
    state = state_of(request)
    now = time.time()
    if state.chart is None or now - state.chart[0] > CHART_TTL_S:
        since = now - queries.DAY_S
        since -= since % BUCKET_S  # the chart's half hours start on the clock's
        counts, replies = await queries.traffic(state.app.db, since, BUCKET_S)
        png = await asyncio.to_thread(traffic_png, counts, replies, since=since, now=now)
        state.chart = (now, png)
    return web.Response(body=state.chart[1], content_type="image/png")


# ---------------------------------------------------------------------------- versions

async def versions(request: web.Request) -> web.Response:
    state = state_of(request)
    learning = state.app.learning
    if learning is None:
        return html(pages.versions_page([], None, {}, None, learning=False, **context(request)))
    found, active, replies = await queries.versions(learning.registry, state.app.store.messages)
    serving = getattr(learning, "serving", None)
    return html(pages.versions_page(found, active, replies, serving, learning=True, **context(request)))


async def _switch(request: web.Request, target: str | None) -> web.Response:
    learning = state_of(request).app.learning
    if learning is None:
        return done(request, "/versions", "The learning loop is off: there are no versions.", ok=False)
    try:
        version, old = await learning.rollback(target, who="dashboard")
    except Exception as exc:  # RegistryError (unknown version, does not load) and friends: say why
        return done(request, "/versions", f"Not switched: {exc}", ok=False)
    await audit(request, "rollback", version.name)
    try:
        await learning.sync_versions()
    except Exception:
        log.exception("could not mirror the registry into model_versions")
    return done(request, "/versions", f"Now serving {version.name} (was {old}).")


async def activate(request: web.Request) -> web.Response:
    form = await request.post()
    name = form.get("version")
    if not isinstance(name, str) or not VERSION_NAME.fullmatch(name.strip()):
        return done(request, "/versions", "Choose a version like v0003.", ok=False)
    return await _switch(request, name.strip())


async def rollback(request: web.Request) -> web.Response:
    return await _switch(request, None)


async def loss_curve(request: web.Request) -> web.StreamResponse:
    """A version's loss-curve picture: only ever a file inside the registry folder."""
    learning = state_of(request).app.learning
    name = request.match_info["name"]
    if learning is None or not VERSION_NAME.fullmatch(name):
        raise web.HTTPNotFound()
    registry = learning.registry
    try:
        version = await asyncio.to_thread(registry.get, name)
    except Exception:
        raise web.HTTPNotFound() from None
    path = version.loss_curve
    if path is None:
        raise web.HTTPNotFound()
    path = path.resolve()
    if not path.is_relative_to(registry.root.resolve()):
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": "image/png"})


# ---------------------------------------------------------------------------- training

async def _training_state(state: DashboardState) -> dict:
    learning = state.app.learning
    running = queries.running_run(learning)
    other = await queries.other_process_run(learning)
    progress = state.progress
    run_id = running["run_id"] if running else (progress.last_result or {}).get("run_id")
    lines = progress.for_run(run_id)
    return {"running": running, "other": other, "lines": lines, "last_result": progress.last_result,
            "html": pages.progress_panel(running, lines, progress.last_result, other)}


async def training(request: web.Request) -> web.Response:
    state = state_of(request)
    learning = state.app.learning
    if learning is None:
        return html(pages.training_page([], None, [], None, None, learning=False, **context(request)))
    now = await _training_state(state)
    runs = await state.app.store.runs.training_runs(50)
    return html(pages.training_page(runs, now["running"], now["lines"], now["last_result"], now["other"],
                                    learning=True, extra=await feedback_section(state.app), **context(request)))


async def training_json(request: web.Request) -> web.Response:
    state = state_of(request)
    if state.app.learning is None:
        return web.json_response({"learning": False, "running": None, "html": ""})
    return web.json_response({"learning": True, **await _training_state(state),
                              "canary": await canary_summary(state.app)})


async def retrain(request: web.Request) -> web.Response:
    learning = state_of(request).app.learning
    if learning is None:
        return done(request, "/training", "The learning loop is off ([learning] enabled = false).", ok=False)
    try:
        run_id = await learning.start_run("dashboard", force=True)
    except Exception as exc:  # AlreadyRunning (here or in another process) and friends
        return done(request, "/training", f"Not started: {exc}", ok=False)
    await audit(request, "retrain", None)
    return done(request, "/training", f"Retrain started: run #{run_id}.")


# ---------------------------------------------------------------------------- chats

async def chats(request: web.Request) -> web.Response:
    state = state_of(request)
    db = state.app.db
    summary = await queries.chat_summary(db)
    opted_out = await queries.opted_out_chats(db)
    messages = await queries.recent_messages(db) if state.config.show_messages else None
    return html(pages.chats_page(summary, opted_out, messages, **context(request)))


# ---------------------------------------------------------------------------- machines

async def prometheus(request: web.Request) -> web.Response:
    state = state_of(request)
    snap = await metrics.snapshot(state.app, state.platforms, state.started_at, state.stored)
    from prometheus_client import CONTENT_TYPE_LATEST

    return web.Response(body=metrics.render(snap), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(text=assets.CSS, content_type="text/css", headers={"Cache-Control": "max-age=300"})


async def script(request: web.Request) -> web.Response:
    return web.Response(text=assets.JS, content_type="application/javascript",
                        headers={"Cache-Control": "max-age=300"})


def add_routes(webapp: web.Application) -> None:
    webapp.add_routes([
        web.get("/login", login_form), web.post("/login", login), web.post("/logout", logout),
        web.get("/", overview), web.get("/api/overview", overview_json), web.get("/charts/traffic.png", traffic_chart),
        web.get("/versions", versions), web.post("/versions/activate", activate),
        web.post("/versions/rollback", rollback), web.get("/versions/{name}/loss_curve.png", loss_curve),
        web.get("/training", training), web.get("/api/training", training_json), web.post("/training/retrain", retrain),
        web.get("/chats", chats), web.get("/metrics", prometheus),
        web.get("/static/dashboard.css", stylesheet), web.get("/static/dashboard.js", script),
    ])
