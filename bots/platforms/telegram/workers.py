"""Telegram with several workers behind one webhook (a shared PostgreSQL database).

* The webhook secret comes from TELEGRAM_WEBHOOK_SECRET, the same on every worker (a random
  one per start would leave only the last worker to start accepting updates).
* One worker registers the webhook (setWebhook); the others find its fingerprint (a hash of
  URL, secret and update types) in the database and leave it alone.
* Every delivered update is claimed in the database before it is handled: a second delivery,
  to this worker or another, is acknowledged without being handled again; one whose worker
  died before storing it is taken over. Updates a dead worker stored but never finished are
  re-handled by a survivor from the payload kept with the claim (replies it left 'pending'
  are marked failed first, so the survivor answers instead of staying silent).
* Polling stays single-worker: the poller holds a lease, and a second one refuses to start.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets

from telegram import Update

from bots.chat.events import PlatformStartError
from bots.platforms.redaction import register_secret
from storage.cluster import CLAIM_TAKEN_OVER

log = logging.getLogger(__name__)

SECRET_ENV = "TELEGRAM_WEBHOOK_SECRET"
SECRET_FORMAT = re.compile(r"[A-Za-z0-9_-]{1,256}")   # what setWebhook accepts
WEBHOOK_STATE = "telegram_webhook"
WEBHOOK_LEASE = "telegram-webhook-setup"
POLL_LEASE = "telegram-poll"


def webhook_secret(given: str | None, cluster) -> str:
    """The secret Telegram must send back: TELEGRAM_WEBHOOK_SECRET, else (one worker only) a
    fresh random one per start. Registered for redaction before anything can log it."""
    secret = (given or "").strip()
    if not secret:
        if cluster is not None:
            raise PlatformStartError(f"several workers share this bot: set {SECRET_ENV} in the environment, the "
                                     "same on every worker (1-256 of A-Z a-z 0-9 _ -)")
        secret = secrets.token_urlsafe(32)
    elif not SECRET_FORMAT.fullmatch(secret):
        raise PlatformStartError(f"{SECRET_ENV} may hold only A-Z, a-z, 0-9, _ and - (1 to 256 of them)")
    register_secret(secret, f"<{SECRET_ENV}>")
    return secret


def fingerprint(url: str, secret: str, allowed_updates) -> str:
    return hashlib.sha256(json.dumps([url, secret, list(allowed_updates)]).encode()).hexdigest()


async def register_webhook(bot, cluster, url: str, secret: str, allowed_updates, *, wait_s: float = 30.0) -> bool:
    """setWebhook unless another worker already registered this very webhook; True if we did."""
    if cluster is None:
        await bot.set_webhook(url, secret_token=secret, allowed_updates=allowed_updates, drop_pending_updates=False)
        return True
    wanted = fingerprint(url, secret, allowed_updates)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        if await cluster.store.state(WEBHOOK_STATE) == wanted:
            log.info("telegram: the webhook is already registered (by this cluster); not setting it again")
            return False
        if await cluster.hold(WEBHOOK_LEASE, wait_s) or loop.time() >= deadline:
            break
        await asyncio.sleep(0.5)          # another worker is registering it right now
    try:
        if await cluster.store.state(WEBHOOK_STATE) == wanted:
            return False
        await bot.set_webhook(url, secret_token=secret, allowed_updates=allowed_updates, drop_pending_updates=False)
        await cluster.store.set_state(WEBHOOK_STATE, wanted)
        log.info("telegram: registered the webhook for every worker")
        return True
    finally:
        await cluster.let_go(WEBHOOK_LEASE)


async def take_poll(cluster, platform: str) -> None:
    """Polling is for one worker: take its lease (renewed with the heartbeat) or refuse to start."""
    if cluster is None:
        return
    if not await cluster.hold(POLL_LEASE):
        holder = await cluster.store.holder(POLL_LEASE)
        raise PlatformStartError(f"another worker ({holder}) is polling Telegram for this bot; polling serves one "
                                 'worker only: use [telegram] mode = "webhook" to run several')

    async def renew() -> None:
        if not await cluster.hold(POLL_LEASE):
            log.error("telegram: lost the polling lease to another worker")
    cluster.on_beat.append(renew)


class WebhookClaims:
    """What the webhook server asks before handling an update, and tells once it is stored / done."""

    def __init__(self, cluster, platform: str, application, tracker) -> None:
        self.cluster = cluster
        self.platform = platform
        self.application = application
        self.tracker = tracker
        self._tasks: set[asyncio.Task] = set()
        tracker.on_finished = self._finished
        cluster.takeovers[platform] = self.take_over

    async def claim(self, update: Update, payload: str) -> bool:
        """True: handle it here. Taken over from a dead worker (a redelivery reached this one
        first), the dead one's unconfirmed reply is failed first, as the takeover loop does."""
        state = await self.cluster.claim(self.platform, str(update.update_id), payload)
        if state == CLAIM_TAKEN_OVER:
            log.warning("telegram update %s: its worker died before finishing it; handling it here", update.update_id)
            await self._fail_pending(update)
        return state is not None

    async def _fail_pending(self, update: Update) -> None:
        message = update.message
        if message is not None:
            await self.cluster.store.fail_pending_replies(self.platform, str(message.chat.id), str(message.message_id))

    async def stored(self, update_id: int) -> None:
        await self.cluster.stored(self.platform, str(update_id))

    def _finished(self, update_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._done(update_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _done(self, update_id: int) -> None:
        try:
            await self.cluster.done(self.platform, str(update_id))
        except Exception:
            log.warning("telegram: could not mark update %s done (a survivor may re-check it)", update_id)

    async def take_over(self, key: str, payload: str | None) -> None:
        """Handle an update a dead worker claimed and did not finish."""
        if not payload:
            await self.cluster.done(self.platform, key)
            return
        update = Update.de_json(json.loads(payload), self.application.bot)
        if update is None:
            await self.cluster.done(self.platform, key)
            return
        if self.tracker.in_progress(update.update_id):    # a redelivery got here first
            return
        await self._fail_pending(update)
        if self.tracker.in_progress(update.update_id):     # ... or while its reply was being failed
            return
        self.tracker.fetched([update.update_id])
        await self.application.update_queue.put(update)
