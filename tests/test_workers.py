"""Several `mynah run` workers on one PostgreSQL database behind a round-robin proxy, with the
fake Bot API pushing webhooks as Telegram does: one webhook registration, a delivery to two
workers handled once, and a worker SIGKILLed mid-traffic losing and duplicating nothing.
Real processes, a real PostgreSQL (MYNAH_TEST_PG_URL), a real tiny model."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from storage import open_database
from storage.store import Store
from tests.fakes.telegram_api import TOKEN, FakeTelegram
from tests.fakes.webhook_push import SECRET_HEADER, RoundRobinProxy, WebhookPusher, wait_until
from tests.test_telegram import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "shared-webhook-secret_0123456789"
pytestmark = pytest.mark.timeout(420)


class Worker:
    def __init__(self, proc, port: int):
        self.proc, self.port, self.lines = proc, port, []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for line in self.proc.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    @property
    def up(self) -> bool:
        return any("telegram is up" in line for line in self.lines)

    def output(self) -> str:
        return "\n".join(self.lines[-40:])


async def start_worker(tmp_path: Path, n: int, model: Path, fake: FakeTelegram, pg_url: str, hook: str) -> Worker:
    port = free_port()
    config = tmp_path / f"worker{n}.toml"
    config.write_text(
        f'[model]\npath = "{model}"\n'
        f'[storage]\nurl = "{pg_url}"\nheartbeat_seconds = 1.0\nworker_timeout_seconds = 6.0\n'
        f'[generation]\nmax_new_tokens = 4\nseed = 1\n[chat]\nstream = false\n'
        f'[telegram]\nbase_url = "{fake.base_url}"\nmode = "webhook"\nwebhook_url = "{hook}"\n'
        f'webhook_listen = "127.0.0.1"\nwebhook_port = {port}\n', encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_WEBHOOK_SECRET=SECRET,
               OMP_NUM_THREADS="1")
    env.pop("DISCORD_BOT_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "scripts.cli", "--config", str(config), "run",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
    return Worker(proc, port)


async def stored_chat(pg_url: str, chat: int) -> list[tuple]:
    db = await open_database(pg_url, migrate=False)
    try:
        rows = await db.fetchall(
            "SELECT m.id, m.role, m.text, m.status, m.reply_to_id FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE c.platform = 'telegram' AND c.platform_chat_id = ? ORDER BY m.id", (str(chat),))
        return [tuple(r) for r in rows]
    finally:
        await db.close()


SETTLED_MESSAGES = (   # user messages with a sent reply, or with an unconfirmed one and a newer message after it
    "SELECT COUNT(*) FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.role = 'user' "
    "AND c.platform_chat_id != ? AND (EXISTS (SELECT 1 FROM messages r WHERE r.reply_to_id = m.id AND r.status = 'ok') "
    "OR (EXISTS (SELECT 1 FROM messages r WHERE r.reply_to_id = m.id AND r.status = 'failed') AND EXISTS ("
    "SELECT 1 FROM messages n WHERE n.chat_id = m.chat_id AND n.role = 'user' AND n.id > m.id)))")


def assert_answered_once_in_order(rows: list[tuple], texts: list[str]) -> None:
    users = [r for r in rows if r[1] == "user"]
    assert [r[2] for r in users] == texts, rows                    # each stored once, in order
    replies = [r for r in rows if r[1] == "bot" and r[3] == "ok"]
    answered = [r[4] for r in replies]
    assert answered == sorted(set(answered)), rows                 # at most one sent reply to each, in order
    assert answered[-1] == users[-1][0], rows                       # the last message answered
    for user in users:   # one with no recorded reply: the killed worker sent one it never confirmed,
        if user[0] not in answered:   # the user went on, and a late second answer would come out of order
            assert any(r[1] == "bot" and r[3] == "failed" and r[4] == user[0] for r in rows), rows


async def test_three_workers_behind_a_proxy_survive_a_sigkill(tmp_path, tiny_dialogpt, pg_url):
    fake = await FakeTelegram().start()
    ports = []
    workers: list[Worker] = []
    proxy = pusher = None
    try:
        proxy_port = free_port()
        hook = f"http://127.0.0.1:{proxy_port}/hook"
        workers = [await start_worker(tmp_path, n, tiny_dialogpt, fake, pg_url, hook) for n in range(3)]
        ports = [w.port for w in workers]
        try:
            await wait_until(lambda: all(w.up for w in workers), 180, "three workers up")
        except AssertionError:
            raise AssertionError("\n\n".join(w.output() for w in workers)) from None
        assert len(fake.calls_to("setWebhook")) == 1                     # one worker registered it
        assert fake.calls_to("setWebhook")[0].params["secret_token"] == SECRET

        proxy = await RoundRobinProxy(ports).start(proxy_port)

        # the same update delivered to two workers at once: handled once
        twice = fake.message(4999, "hello there")
        fake.updates.remove(twice)
        async with aiohttp.ClientSession() as session:
            async def post(port):
                async with session.post(f"http://127.0.0.1:{port}/hook", json=twice,
                                        headers={SECRET_HEADER: SECRET}) as r:
                    return r.status
            assert await asyncio.gather(post(ports[0]), post(ports[1])) == [200, 200]
        await fake.wait_sent(4999, 1, timeout=60)

        pusher = await WebhookPusher(fake, hook, SECRET).start()
        users = list(range(5000, 5020))
        texts = {u: [f"hello number {i} from {u}" for i in range(3)] for u in users}
        killed_at = None

        async def converse(user: int) -> None:
            for i, text in enumerate(texts[user]):
                fake.message(user, text)
                await fake.wait_sent(user, i + 1, timeout=150)

        talks = asyncio.gather(*(converse(u) for u in users))
        # Kill when a third of the replies are recorded as sent, not at the instant the fake Bot
        # API sees a send: a worker killed between Telegram accepting a reply and recording it
        # cannot know the reply went out, and its successor sends it again (docs/SCALING.md).
        watcher = await open_database(pg_url, migrate=False)
        try:
            deadline = time.monotonic() + 150
            while (await watcher.fetchone("SELECT COUNT(*) FROM messages WHERE role = 'bot' AND status = 'ok'"))[0] < 21:
                assert time.monotonic() < deadline, "a third of the replies never came"
                await asyncio.sleep(0.1)
        finally:
            await watcher.close()
        workers[1].proc.send_signal(signal.SIGKILL)                      # mid-traffic
        killed_at = time.monotonic()
        await asyncio.wait_for(talks, 240)
        watcher = await open_database(pg_url, migrate=False)
        try:   # every update finished (the dead worker's taken over) and every message answered or moved on from
            while (await watcher.fetchone("SELECT COUNT(*) FROM update_claims WHERE done_at IS NULL"))[0] or (
                    await watcher.fetchone(SETTLED_MESSAGES, ("4999",)))[0] < 60:
                assert time.monotonic() - killed_at < 240, "some message was never answered"
                await asyncio.sleep(0.1)
        finally:
            await watcher.close()
        recovered_s = time.monotonic() - killed_at
        await asyncio.sleep(2.0)                                         # no late duplicates either

        assert len(fake.sent(4999)) == 1
        resent = moved_on = 0
        for u in users:
            rows = await stored_chat(pg_url, u)
            assert_answered_once_in_order(rows, texts[u])   # stored once, at most one confirmed reply each, in order
            # The one duplicate allowed: a reply the killed worker may have sent but never
            # confirmed (still 'pending'); the survivor marked it failed and, unless the chat
            # had moved on meanwhile, answered again.
            unconfirmed = sum(1 for r in rows if r[1] == "bot" and r[3] == "failed")
            assert 3 <= len(fake.sent(u)) <= 3 + unconfirmed, (u, fake.texts(u), rows)
            resent += len(fake.sent(u)) - 3
            confirmed = {r[4] for r in rows if r[1] == "bot" and r[3] == "ok"}
            moved_on += sum(1 for r in rows if r[1] == "user" and r[0] not in confirmed)
        # A worker starting (a rolling restart) while another is mid-send leaves that one's
        # 'pending' reply alone: dead workers' pending replies come back with their updates.
        db = await open_database(pg_url, migrate=False)
        try:
            store = Store.over(db)
            chat = await store.chats.chat("telegram", 7777)
            asked = await store.messages.log_message(chat, "user", "mid-send", platform_message_id=1)
            sending = await store.messages.log_message(chat, "bot", "on its way", reply_to_id=asked,
                                                       status="pending")
            workers.append(await start_worker(tmp_path, 3, tiny_dialogpt, fake, pg_url, hook))
            await wait_until(lambda: workers[-1].up, 180, "a fourth worker up")
            await asyncio.sleep(3.0)
            assert fake.sent(7777) == []
            assert (await db.fetchone("SELECT status FROM messages WHERE id = ?", (sending,)))[0] == "pending"
        finally:
            await db.close()
        print(f"\nall 60 stored once and answered; {resent} reply(ies) the killed worker had not confirmed were "
              f"sent again, {moved_on} not answered again because the chat had moved on; {recovered_s:.1f} s from the "
              "SIGKILL to the last reply")
    finally:
        if pusher is not None:
            await pusher.close()
        if proxy is not None:
            await proxy.close()
        for w in workers:
            if w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 60)
            except asyncio.TimeoutError:
                w.proc.kill()
            w.reader.cancel()
        await fake.close()


def test_the_webhook_secret_comes_from_the_environment_when_several_workers_share_the_bot():
    from bots.chat.events import PlatformStartError
    from bots.platforms.redaction import redact
    from bots.platforms.telegram.workers import webhook_secret

    alone = webhook_secret(None, None)                    # one worker: a fresh random secret per start
    assert len(alone) >= 32 and alone not in redact(f"x {alone} y")
    with pytest.raises(PlatformStartError, match="TELEGRAM_WEBHOOK_SECRET"):
        webhook_secret(None, object())                    # several workers need the shared one
    with pytest.raises(PlatformStartError, match="only A-Z"):
        webhook_secret("not allowed!", object())
    assert webhook_secret(SECRET, object()) == SECRET
    assert SECRET not in redact(f"posted with {SECRET}")  # never in a log line


async def test_a_second_polling_worker_refuses_to_start(pg_url):
    from bots.chat.events import PlatformStartError
    from bots.cluster import Presence
    from bots.platforms.telegram.workers import take_poll
    from storage.cluster import ClusterStore

    dbs = [await open_database(pg_url) for _ in range(2)]
    first, second = [await Presence(ClusterStore(db), heartbeat_s=0.2, stale_after_s=1.0).start() for db in dbs]
    try:
        await take_poll(first, "telegram")
        with pytest.raises(PlatformStartError, match='mode = "webhook"'):
            await take_poll(second, "telegram")
        await asyncio.sleep(1.5)                          # renewed with the heartbeat: still the first's
        with pytest.raises(PlatformStartError):
            await take_poll(second, "telegram")
    finally:
        for presence, db in zip((first, second), dbs):
            await presence.stop()
            await db.close()
