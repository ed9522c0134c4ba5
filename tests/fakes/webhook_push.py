"""Telegram's side of webhook mode, and a load balancer in front of several workers.

`WebhookPusher` takes the updates queued in a FakeTelegram and POSTs them, as Telegram does
after setWebhook, with the registered secret: one update at a time per chat, the next only
after a 200, and a failed or refused post (5xx, a dropped connection) is retried after a
short pause. `RoundRobinProxy` is nginx's upstream block in miniature: each request goes to
the next worker, and on a refused or dropped connection to the one after (proxy_next_upstream
error), answering 502 only when every worker failed.
"""
from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
from aiohttp import web

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


class RoundRobinProxy:
    def __init__(self, ports: list[int]):
        self.ports = list(ports)
        self._next = itertools.cycle(range(len(self.ports)))
        self.port = 0
        self.forwarded: list[tuple[int, int]] = []       # (worker port, status)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, port: int = 0) -> "RoundRobinProxy":
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", SECRET_HEADER.lower())}
        first = next(self._next)
        for i in range(len(self.ports)):
            port = self.ports[(first + i) % len(self.ports)]
            try:
                async with self._session.request(request.method, f"http://127.0.0.1:{port}{request.path_qs}",
                                                 data=body, headers=headers) as r:
                    self.forwarded.append((port, r.status))
                    return web.Response(status=r.status, body=await r.read())
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError):
                self.forwarded.append((port, 0))
                continue            # that worker is down: the next one (proxy_next_upstream error)
        return web.Response(status=502)


class WebhookPusher:
    def __init__(self, fake, url: str, secret: str, retry_s: float = 0.3):
        self.fake, self.url, self.secret, self.retry_s = fake, url, secret, retry_s
        self.posts: list[tuple[int, int]] = []     # (update_id, status)
        self._task: asyncio.Task | None = None
        self._chats: dict[int, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> "WebhookPusher":
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        self._task = asyncio.create_task(self._run())
        return self

    async def close(self) -> None:
        for task in [self._task, *self._chats.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in [self._task, *self._chats.values()] if t), return_exceptions=True)
        await self._session.close()

    async def _run(self) -> None:
        queues: dict[int, asyncio.Queue] = {}
        while True:
            while self.fake.updates:
                update = self.fake.updates.pop(0)
                chat = update.get("message", {}).get("chat", {}).get("id", 0)
                if chat not in queues:
                    queues[chat] = asyncio.Queue()
                    self._chats[chat] = asyncio.create_task(self._chat(queues[chat]))
                queues[chat].put_nowait(update)
            await asyncio.sleep(0.02)

    async def _chat(self, queue: asyncio.Queue) -> None:
        while True:
            update = await queue.get()
            while not await self.post(update):
                await asyncio.sleep(self.retry_s)

    async def post(self, update: dict) -> bool:
        try:
            async with self._session.post(self.url, json=update, headers={SECRET_HEADER: self.secret}) as r:
                self.posts.append((update["update_id"], r.status))
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            self.posts.append((update["update_id"], 0))
            return False


async def wait_until(predicate, timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
