"""A Telegram webhook worker taking over what a dead worker left: through a redelivery (the
claim path) and through the takeover loop, racing each other in one worker. The real PTB
Application in webhook mode, the real engine with a tiny model, a real PostgreSQL
(MYNAH_TEST_PG_URL); a dead worker is a `workers` row that stopped beating."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from bots.app import Mynah
from bots.config import parse_config
from bots.platforms.telegram.adapter import TelegramAdapter
from storage.cluster import ClusterStore
from storage.store import Store
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.fakes.webhook_push import SECRET_HEADER
from tests.test_telegram import free_port

SECRET = "takeover-secret_0123456789"
DEAD = "gone-host:1:dead00"
pytestmark = pytest.mark.timeout(120)


def update(update_id: int, chat: int, message_id: int, text: str) -> dict:
    return {"update_id": update_id, "message": {"message_id": message_id, "date": int(time.time()),
                                                "chat": {"id": chat, "type": "private", "first_name": "U"},
                                                "from": {"id": chat, "is_bot": False, "first_name": "U"},
                                                "text": text}}


@pytest.fixture
async def worker(tmp_path, tiny_dialogpt, pg_url):
    fake = await FakeTelegram().start()
    port = free_port()
    config = parse_config({
        "model": {"path": str(tiny_dialogpt)}, "generation": {"max_new_tokens": 3, "seed": 1},
        "storage": {"url": pg_url, "heartbeat_seconds": 60.0, "worker_timeout_seconds": 120.0},  # no sweep by itself
        "chat": {"stream": False},
        "telegram": {"base_url": fake.base_url, "mode": "webhook", "webhook_url": f"http://127.0.0.1:{port}/hook",
                     "webhook_listen": "127.0.0.1", "webhook_port": port}})
    app = await Mynah.open(config)
    asks: list[str] = []
    real = app.engine.reply

    async def slow_reply(turns, overrides=None, **kwargs):   # a spy: the real engine answers, a moment later
        asks.append(turns[-1][1])
        await asyncio.sleep(1.0)
        return await real(turns, overrides, **kwargs)

    app.engine.reply = slow_reply
    adapter = TelegramAdapter(app, TOKEN, poll_timeout=2, retry_delay=0.05, webhook_secret=SECRET)
    await adapter.start()
    try:
        yield app, fake, f"http://127.0.0.1:{port}/hook", asks
    finally:
        await adapter.stop()
        await app.close()
        await fake.close()


async def dead_worker_left(app, body: dict, *, pending_reply: bool) -> tuple[int, int | None]:
    """What a worker killed mid-answer leaves: its claim (with the payload), the stored user
    message and, if it got that far, a reply stored 'pending' it never confirmed sending."""
    cluster, store = ClusterStore(app.store.db), Store.over(app.store.db)
    await cluster.heartbeat(DEAD, "gone-host", 1, None)
    async with app.store.db.transaction() as conn:
        await conn.execute("UPDATE workers SET last_seen = last_seen - 3600 WHERE id = ?", (DEAD,))
    assert await cluster.claim("telegram", str(body["update_id"]), DEAD, stale_after=1e9,
                               payload=json.dumps(body)) == "mine"
    message = body["message"]
    chat = await store.chats.chat("telegram", str(message["chat"]["id"]))
    asked = await store.messages.log_message(chat, "user", message["text"], platform_message_id=message["message_id"])
    pending = None
    if pending_reply:
        pending = await store.messages.log_message(chat, "bot", "half sent", reply_to_id=asked, status="pending")
    return asked, pending


async def answers(app, asked: int) -> list[tuple]:
    rows = await app.store.db.fetchall("SELECT id, status FROM messages WHERE reply_to_id = ? ORDER BY id", (asked,))
    return [tuple(r) for r in rows]


async def post(url: str, body: dict) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={SECRET_HEADER: SECRET}) as response:
            return response.status


async def test_a_redelivery_that_takes_over_fails_the_dead_workers_reply_and_answers(worker):
    app, fake, url, asks = worker
    body = update(9001, 8100, 40, "are you still there?")
    asked, pending = await dead_worker_left(app, body, pending_reply=True)
    assert await post(url, body) == 200                       # Telegram redelivers; this worker claims it
    await fake.wait_sent(8100, 1, timeout=30)
    await asyncio.sleep(0.5)
    rows = await answers(app, asked)
    assert rows[0] == (pending, "failed") and [s for _, s in rows[1:]] == ["ok"]   # answered again, once
    assert len(fake.sent(8100)) == 1 and asks == ["are you still there?"]
    users = await app.store.db.fetchall("SELECT COUNT(*) FROM messages WHERE role = 'user'")
    assert users[0][0] == 1                                                       # stored once


async def test_the_takeover_loop_and_a_redelivery_in_one_worker_handle_it_once(worker):
    app, fake, url, asks = worker
    body = update(9002, 8200, 41, "hello again")
    asked, _ = await dead_worker_left(app, body, pending_reply=False)
    delivery = asyncio.ensure_future(post(url, body))         # the redelivery claims it and starts answering ...
    while not asks:
        await asyncio.sleep(0.02)
    took = await app.cluster.take_over()                      # ... when the takeover loop finds it too
    assert took == 0                                          # it is this worker's now: nothing orphaned
    await app.cluster.takeovers["telegram"]("9002", json.dumps(body))   # and had the sweep got it first
    assert await delivery == 200
    await fake.wait_sent(8200, 1, timeout=30)
    await asyncio.sleep(1.5)
    assert asks == ["hello again"] and len(fake.sent(8200)) == 1
    assert [s for _, s in await answers(app, asked)] == ["ok"]


async def test_a_discord_message_taken_over_from_a_dead_worker_gets_answered_again(pg_url):
    from bots.cluster import Presence
    from bots.platforms.discord.workers import SharedClaims
    from storage import open_database

    db = await open_database(pg_url)
    presence = await Presence(ClusterStore(db), heartbeat_s=60.0, stale_after_s=120.0).start()
    try:
        cluster, store = ClusterStore(db), Store.over(db)
        await cluster.heartbeat(DEAD, "gone-host", 1, None)
        async with db.transaction() as conn:
            await conn.execute("UPDATE workers SET last_seen = last_seen - 3600 WHERE id = ?", (DEAD,))
        assert await cluster.claim("discord", "1234567890123", DEAD, stale_after=1e9) == "mine"
        chat = await store.chats.chat("discord", "555", thread_id="")
        asked = await store.messages.log_message(chat, "user", "hi", platform_message_id=1234567890123)
        pending = await store.messages.log_message(chat, "bot", "half sent", reply_to_id=asked, status="pending")
        claims = SharedClaims(presence)
        assert await claims.take(1234567890123) is True                     # this worker answers it now
        assert (await db.fetchone("SELECT status FROM messages WHERE id = ?", (pending,)))[0] == "failed"
        assert await claims.take(1234567890123) is True                     # its own claim, again
        await claims.done(1234567890123)
        assert await claims.take(1234567890123) is False                    # done: nobody answers twice
    finally:
        await presence.stop()
        await db.close()
