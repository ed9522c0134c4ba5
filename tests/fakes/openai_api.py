"""A fake OpenAI-compatible server (aiohttp on 127.0.0.1) that answers like vLLM's.

GET /v1/models, POST /v1/completions and /v1/chat/completions, with or without SSE
streaming (one `data: {chunk}` per token, then `data: [DONE]`), and errors with
OpenAI-style bodies ({"error": {"message", "type", "code"}}). Like vLLM, chat completions
are refused for a model without a chat template (`chat_template=False`).

Tests steer it: `replies` (texts to answer, in turn; then `default_reply`), `down` (every
request fails: "refuse" closes the connection, or an HTTP status like 503), `fail_next`
(the next n requests fail with a status), and `hold_after` + `release()` (a stream pauses
after that many tokens until the test releases it, so "shown before the stream ended"
needs no timing). A misbehaving server: `ignore_max_tokens` sends the whole reply whatever
max_tokens says, `endless` streams the reply's words over and over until the client hangs up.
`requests` records every JSON body received.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from aiohttp import web

MODEL = "fake/mynah-test-model"


def error_body(status: int, message: str) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status},
            "object": "error", "message": message, "type": kind, "code": status}


class FakeOpenAI:
    def __init__(self, *, model: str = MODEL, chat_template: bool = True, api_key: str | None = None):
        self.model = model
        self.chat_template = chat_template
        self.api_key = api_key
        self.replies: deque[str] = deque()
        self.default_reply = "hello there from the backend"
        self.down: str | int | None = None         # "refuse" or an HTTP status: every request fails
        self._faults: deque[int] = deque()
        self.hold_after: int | None = None         # streams pause after this many tokens until release()
        self._release = asyncio.Event()
        self.token_delay_s = 0.0                   # between streamed tokens
        self.ignore_max_tokens = False             # a misbehaving server: the whole reply, whatever max_tokens says
        self.endless = False                       # a misbehaving server: a stream that never ends
        self.streams_closed = 0                    # streams the client hung up on
        self.requests: list[dict] = []             # JSON bodies of completion requests, in order
        self.paths: list[str] = []
        self.held = asyncio.Event()                # set once a stream is paused at hold_after
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self) -> "FakeOpenAI":
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeOpenAI":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- steering -------------------------------------------------------------------
    def fail_next(self, status: int, times: int = 1) -> None:
        self._faults.extend([status] * times)

    def release(self) -> None:
        self._release.set()

    # ---- routes ---------------------------------------------------------------------
    def _refuse(self, request: web.Request) -> web.StreamResponse | None:
        self.paths.append(request.path)
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response(error_body(401, "Invalid API key"), status=401)
        status = self._faults.popleft() if self._faults else self.down
        if status == "refuse":
            request.transport.close()   # like a server that went away: a connection error
            raise ConnectionResetError("fake backend is down")
        if status is not None:
            return web.json_response(error_body(int(status), f"fake failure {status}"), status=int(status))
        return None

    async def _models(self, request: web.Request) -> web.StreamResponse:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "vllm", "max_model_len": 1024}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _answer(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        refused = self._refuse(request)
        if refused is not None:
            return refused
        body = await request.json()
        self.requests.append(body)
        if body.get("model") != self.model:
            return web.json_response(error_body(404, f"The model `{body.get('model')}` does not exist."), status=404)
        if chat and not self.chat_template:
            return web.json_response(error_body(400, "As of transformers v4.44, default chat template is no longer "
                                                     "allowed, so you must provide a chat template if the tokenizer "
                                                     "does not define one."), status=400)
        text = self.replies.popleft() if self.replies else self.default_reply
        tokens = text.split(" ")
        tokens = [t if i == 0 else " " + t for i, t in enumerate(tokens)]
        if not (self.ignore_max_tokens or self.endless):
            tokens = tokens[: int(body.get("max_tokens") or 10**6)]
        if body.get("stream"):
            return await self._stream(request, tokens, chat)
        content = "".join(tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"} if chat
                  else {"index": 0, "text": content, "finish_reason": "stop", "logprobs": None})
        return web.json_response({
            "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": self.model, "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)}})

    async def _stream(self, request: web.Request, tokens: list[str], chat: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict) -> None:
            chunk = {"id": "cmpl-fake", "object": kind, "created": int(time.time()), "model": self.model,
                     "choices": [choice]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        if self.endless:
            tokens = _forever(tokens)
        try:
            await self._send_tokens(send, tokens, chat)
        except (ConnectionResetError, asyncio.CancelledError):
            self.streams_closed += 1
            raise
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _send_tokens(self, send, tokens, chat: bool) -> None:
        for i, token in enumerate(tokens):
            if self.hold_after is not None and i == self.hold_after:
                self.held.set()
                await self._release.wait()
            elif self.token_delay_s or self.endless:   # an endless stream still lets the loop run
                await asyncio.sleep(self.token_delay_s)
            await send({"index": 0, "delta": {"content": token}, "finish_reason": None} if chat
                       else {"index": 0, "text": token, "finish_reason": None, "logprobs": None})
        await send({"index": 0, "delta": {}, "finish_reason": "stop"} if chat
                   else {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None})


def _forever(tokens: list[str]):
    while True:
        for token in tokens:
            yield token if token.startswith(" ") else " " + token
