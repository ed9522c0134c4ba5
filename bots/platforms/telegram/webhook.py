"""Telegram webhook mode, served by Mynah itself (PTB's "custom webhook" pattern).

PTB's built-in webhook server answers HTTP 200 as soon as an update arrives, and Telegram
forgets an update once it got its 200: a crash before the message reached SQLite lost it.
Here the handler hands the update to the Application (`update_queue`, as the updater
would) and answers 200 only once the user's message is stored, or the update is fully
handled when it stores nothing. If storage is down for longer than Telegram waits, or the
process dies, Telegram gets no 200 and posts the update again later; a repeated post of an
update still in progress waits for that one instead of handling it twice, and storage
recognises a message it already answered.

Only Telegram can post: the secret given to setWebhook (TELEGRAM_WEBHOOK_SECRET, or a fresh
random one per start for a lone worker) must come back with each request, else 403
(compared in constant time). With several workers each update is first claimed in the
database (telegram/workers.py), so a delivery to two workers is handled once.
"""
from __future__ import annotations

import hmac
import json
import logging

from aiohttp import web
from telegram import Update

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


class WebhookServer:
    def __init__(self, application, tracker, *, secret: str, path: str, listen: str, port: int, claims=None):
        self.application = application
        self.tracker = tracker
        self.claims = claims      # several workers: telegram/workers.py WebhookClaims, else None
        self.secret = secret
        self.path = "/" + path.lstrip("/")
        self.listen = listen
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post(self.path, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.listen, self.port).start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            return web.Response(status=403)
        try:
            body = await request.text()
            update = Update.de_json(json.loads(body), self.application.bot)
        except (ValueError, TypeError, KeyError) as exc:
            log.info("telegram webhook: ignoring a request that is not an update: %s", type(exc).__name__)
            return web.Response(status=400)
        if update is None:
            return web.Response(status=400)
        if not self.tracker.in_progress(update.update_id):     # a repeat of one in progress: just wait
            if self.claims is not None:
                try:
                    if not await self.claims.claim(update, body):
                        return web.Response(status=200)      # another worker stored or handled it
                except TimeoutError:
                    return web.Response(status=503)          # still with a live worker: Telegram retries
            if not self.tracker.in_progress(update.update_id):
                self.tracker.fetched([update.update_id])
                await self.application.update_queue.put(update)
        if not await self.tracker.wait_stored(update.update_id):
            return web.Response(status=503)      # stopping before it was stored: Telegram posts it again
        if self.claims is not None:
            await self.claims.stored(update.update_id)
        return web.Response(status=200)
