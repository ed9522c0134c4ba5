"""A ReplyEngine that asks an OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI).

Mynah keeps the conversation (SQLite), the persona, logging with the model version, and
the chat rules; the server only turns a prompt into text. Two ways to ask, by model:

* chat-template models: POST /v1/chat/completions with the context as messages and the
  chat's persona as the system message;
* models without a chat template (DialoGPT, GPT2-chitchat): POST /v1/completions with the
  prompt written in Mynah's own dialogue format (engine/dialogue.py, from the tokenizer in
  `[model] path`: turns joined by the turn separator) and that separator as the stop
  sequence. vLLM refuses chat completions for a tokenizer without a template, and the
  model was trained on exactly this format. These formats have no system role: the
  persona is ignored for them (see DialogueFormat.context_ids).

Sampling maps onto the API: temperature (0 for greedy), top_p, max_tokens, seed; top_k,
repetition_penalty and min_tokens are vLLM extensions (llama.cpp reads top_k too) sent in
the request body unless `extra_sampling` is off (for servers that reject unknown fields).
banned_words are not sent (the server's tokenizer would need them as token ids).

Failures: connection errors, timeouts, 429 and 5xx are retried a bounded number of times
with doubling back-off; then EngineUnavailable. A CircuitBreaker (breaker.py) stops a
dead backend from collecting every chat's retries; it lets a probe through after its
cooldown, so the bot recovers by itself. A stream that fails after text was shown is not
retried (the user has seen part of it): it raises EngineUnavailable too.

A misbehaving server cannot hold a reply or the bot: every reply is bounded in tokens
(max_new_tokens streamed pieces, whatever the server does with max_tokens), characters
(`max_reply_chars`) and time (`timeout_s` for the whole request, streaming included); a
reply cut by a bound keeps what arrived. `stop()` waits `stop_grace_s` for requests in
flight, then aborts them (EngineStopped), so it always returns. Error texts never carry
the credentials of a user:password@ base_url (urls.py).

The API key comes from the caller (bots/app.py reads MYNAH_ENGINE_API_KEY); it is never
logged, and it is not part of any message this module writes.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Sequence

from engine.dialogue import DialogueFormat, defang_markup
from engine.serving.breaker import CircuitBreaker, backoff_delays
from engine.serving.protocol import (FALLBACK_REPLY, EngineBusy, EngineStats, EngineStopped, EngineUnavailable, Reply,
                                     ReplyEngine, ReplyStream, SamplingParams, Route)
from engine.serving.urls import public_url, redact, split_credentials
from engine.types import Turn, percentile

log = logging.getLogger(__name__)


def _retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError)):  # APITimeoutError is one too
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return False


def _why(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = (body.get("error") or body).get("message") if isinstance(body.get("error") or body, dict) else None
        return f"HTTP {exc.status_code}: {message or exc.message}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


class OpenAIEngine(ReplyEngine):
    """Replies from an OpenAI-compatible server; `fmt` None means chat completions."""

    def __init__(self, base_url: str, model: str, defaults: SamplingParams | None = None, *,
                 fmt: DialogueFormat | None = None, api_key: str | None = None, max_context_tokens: int = 256,
                 fallback_reply: str = FALLBACK_REPLY, timeout_s: float = 60.0, retries: int = 2,
                 backoff_s: float = 0.5, breaker: CircuitBreaker | None = None, max_in_flight: int = 256,
                 extra_sampling: bool = True, max_reply_chars: int = 4096, stop_grace_s: float = 5.0):
        self.defaults = defaults or SamplingParams()
        self.base_url = base_url.rstrip("/")
        self.model_name = model
        self.fmt = fmt
        self.max_context_tokens = max_context_tokens
        self.fallback_reply = fallback_reply
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker or CircuitBreaker()
        self.max_in_flight = max_in_flight
        self.extra_sampling = extra_sampling
        self.max_reply_chars = max_reply_chars
        self.stop_grace_s = stop_grace_s
        self._abort = asyncio.Event()        # set by stop(): requests still in flight give up
        self._api_key = api_key or "EMPTY"   # vLLM without --api-key accepts any value
        self._client = None
        self._running = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._served_by = model   # the model name the server reported last
        self._adapter: str | None = None     # a LoRA adapter requests name instead (RemoteModelSwitch)
        self._adapter_version: str | None = None
        self.last_round_trip_s: float | None = None
        self.replies_served = 0
        self.started_at = time.time()

    @property
    def mode(self) -> str:
        return "chat" if self.fmt is None else "completions"

    @property
    def version(self) -> str:
        return self._adapter_version or self._served_by

    # ---- RemoteModelSwitch: the learning loop's LoRA adapters --------------------------
    @property
    def served_model(self) -> str | None:
        """The adapter requests name now; None while they name the backend's base model."""
        return self._adapter

    def set_served_model(self, model: str | None, version: str) -> None:
        """From the next request on, name `model` (None: [engine] model) and log replies as `version`."""
        self._adapter, self._adapter_version = model, version

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._running:
            return
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        # user:password@ in base_url travels as Basic auth (as httpx would send it), never in a logged URL
        url, credentials = split_credentials(self.base_url)
        http = DefaultAsyncHttpxClient(auth=credentials) if credentials else None
        # max_retries=0: retries and back-off are ours, so the circuit breaker sees every failure
        self._client = AsyncOpenAI(base_url=url, api_key=self._api_key, max_retries=0, timeout=self.timeout_s,
                                   http_client=http)
        self._running = True
        self._abort = asyncio.Event()
        log.info("engine: OpenAI-compatible backend %s, model %s, %s", public_url(self.base_url), self.model_name,
                 "chat completions" if self.fmt is None else f"text completions in the {self.fmt.name} format")

    async def stop(self) -> None:
        """Let requests in flight finish for stop_grace_s, then abort them: always returns."""
        self._running = False
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), self.stop_grace_s)
            except asyncio.TimeoutError:
                log.warning("engine: %d backend request(s) still running after %.0f s; aborting them",
                            self._in_flight, self.stop_grace_s)
                self._abort.set()
                await self._idle.wait()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> "OpenAIEngine":
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def check(self) -> list[str]:
        """The served model names (GET /models); raises EngineUnavailable when unreachable."""
        try:
            page = await self._client.models.list()
        except Exception as exc:
            raise EngineUnavailable(f"{public_url(self.base_url)} did not list its models: "
                                    f"{redact(_why(exc), self.base_url)}") from None
        return [m.id for m in page.data]

    # ---- ReplyEngine --------------------------------------------------------------------
    async def reply(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
                    route: Route = None) -> Reply:
        return await self._generate(turns, overrides, system, None)

    def stream(self, turns: Sequence[Turn], overrides: dict | None = None, *, system: str = "",
               route: Route = None) -> ReplyStream:
        return ReplyStream(lambda stream: self._generate(turns, overrides, system, stream))

    def stats(self) -> EngineStats:
        latencies = list(self._latencies)
        return EngineStats(
            model_version=self.version, queue_depth=0, active=self._in_flight, replies=self.replies_served,
            latency_p50_s=percentile(latencies, 0.5), latency_p95_s=percentile(latencies, 0.95),
            uptime_s=time.time() - self.started_at, backend=f"openai {public_url(self.base_url)} ({self.mode})",
            healthy=self.breaker.state == CircuitBreaker.CLOSED, health=self.breaker.describe(),
            backend_latency_s=self.last_round_trip_s,
        )

    # ---- one request, retried -----------------------------------------------------------
    async def _generate(self, turns: Sequence[Turn], overrides: dict | None, system: str,
                        stream: ReplyStream | None) -> Reply:
        params = self.defaults.merged(overrides)
        if not self._running:
            raise EngineStopped("the engine is not running")
        if self._in_flight >= self.max_in_flight:
            raise EngineBusy(f"{self._in_flight} requests are already waiting for the backend")
        request = self.request_body(turns, params, system)
        started = time.monotonic()
        self._in_flight += 1
        self._idle.clear()
        try:
            text, new_tokens = await self._with_retries(request, stream)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        latency = time.monotonic() - started
        self._latencies.append(latency)
        self.replies_served += 1
        text = text.strip()
        return Reply(text=text or self.fallback_reply, model_version=self.version,
                     new_tokens=new_tokens, latency_s=latency, fallback=not text)

    async def _with_retries(self, request: dict, stream: ReplyStream | None) -> tuple[str, int]:
        delays = backoff_delays(self.retries, self.backoff_s)
        for attempt in range(self.retries + 1):
            if not self.breaker.allow():
                raise EngineUnavailable(f"the backend is down ({self.breaker.describe()})")
            shown = [False]
            started = time.monotonic()
            try:
                result = await self._bounded(request, stream, shown)
            except EngineStopped:
                raise
            except Exception as exc:
                why = redact(_why(exc), self.base_url)
                if not _retryable(exc):
                    self.breaker.success()   # the server answered: it is up, the request was wrong
                    raise RuntimeError(f"the backend refused the request: {why}") from None
                self.breaker.failure()
                if shown[0] or attempt == self.retries:
                    raise EngineUnavailable(f"the backend failed: {why}") from None
                log.warning("engine: backend request failed (%s); retry %d/%d in %.1f s", why, attempt + 1,
                            self.retries, delays[attempt])
                await asyncio.sleep(delays[attempt])
                continue
            self.breaker.success()
            self.last_round_trip_s = time.monotonic() - started
            return result
        raise AssertionError("unreachable")

    async def _bounded(self, request: dict, stream: ReplyStream | None, shown: list[bool]) -> tuple[str, int]:
        """_send within the deadline and until stop() aborts: a reply cut by the deadline after
        text was shown keeps that text; before, the timeout is retried like any other."""
        pieces: list[str] = []
        work = asyncio.ensure_future(self._send(request, stream, shown, pieces))
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            await asyncio.wait({work, aborted}, timeout=self.timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, aborted):
                if not task.done():
                    task.cancel()
            await asyncio.gather(work, aborted, return_exceptions=True)
        if not work.cancelled():
            return work.result()
        if self._abort.is_set():
            raise EngineStopped("the engine stopped while the backend was still answering")
        if not pieces:
            raise asyncio.TimeoutError(f"no reply within {self.timeout_s:g} s")
        log.warning("engine: the backend's reply was cut at the %g s deadline", self.timeout_s)
        return "".join(pieces), len(pieces)

    async def _send(self, request: dict, stream: ReplyStream | None, shown: list[bool],
                    pieces: list[str]) -> tuple[str, int]:
        """One HTTP request: (text, tokens); with a stream, the deltas are pushed as they arrive
        (into `pieces` too) until the reply ends or reaches max_tokens pieces or max_reply_chars."""
        api = self._client.chat.completions if self.fmt is None else self._client.completions
        if stream is None:
            response = await api.create(**request)
            self._served_by = response.model or self._served_by
            tokens = (response.usage.completion_tokens or 0) if response.usage is not None else 0
            choice = response.choices[0]
            text = (choice.message.content or "") if self.fmt is None else (choice.text or "")
            if len(text) > self.max_reply_chars:
                log.warning("engine: the backend's reply had %d characters; cut at %d", len(text), self.max_reply_chars)
            return text[:self.max_reply_chars], min(tokens, request["max_tokens"])
        chars, max_tokens = 0, request["max_tokens"]
        chunks = await api.create(**request, stream=True)
        try:
            async for chunk in chunks:
                self._served_by = chunk.model or self._served_by
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                delta = (choice.delta.content or "") if self.fmt is None else (choice.text or "")
                if not pieces:
                    delta = delta.lstrip()
                delta = delta[:self.max_reply_chars - chars]
                if delta:
                    pieces.append(delta)
                    chars += len(delta)
                    shown[0] = True
                    stream.push(delta)
                if len(pieces) >= max_tokens or chars >= self.max_reply_chars:
                    log.warning("engine: the backend's stream passed %d pieces or %d characters; cut there",
                                max_tokens, self.max_reply_chars)
                    break
        finally:
            await chunks.close()   # a stream left early (a bound, a deadline) closes its connection
        return "".join(pieces), len(pieces)   # one chunk per token on vLLM

    # ---- what is sent ---------------------------------------------------------------------
    def request_body(self, turns: Sequence[Turn], params: SamplingParams, system: str = "") -> dict:
        """The create() arguments for this context and these sampling settings."""
        body: dict = {"model": self._adapter or self.model_name, "max_tokens": params.max_new_tokens,
                      "temperature": params.temperature if params.do_sample else 0.0, "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if self.extra_sampling:
            body["extra_body"] = {"top_k": params.top_k if params.top_k > 0 else -1,
                                  "repetition_penalty": params.repetition_penalty,
                                  "min_tokens": params.min_new_tokens}
        if self.fmt is None:   # the server renders its chat template: no text may spell a control token
            messages = [{"role": "system", "content": defang_markup(system)}] if system else []
            messages += [{"role": "assistant" if role == "bot" else "user", "content": defang_markup(text)}
                         for role, text in turns]
            body["messages"] = messages
        else:
            body["prompt"], body["stop"] = self.prompt(turns, params)
        return body

    def prompt(self, turns: Sequence[Turn], params: SamplingParams) -> tuple[str, list[str]]:
        """Mynah's dialogue format as text, and the turn separator as the stop sequence.

        The server tokenizes this text, so the safe ids of a typed `<|endoftext|>` would turn
        back into the control token: each turn is decoded alone and defanged, and only Mynah
        writes the separators."""
        tokenizer, fmt = self.fmt.tokenizer, self.fmt
        specials = tokenizer.all_special_tokens
        ids = fmt.context_ids([(role, defang_markup(text, specials)) for role, text in turns],
                              max(8, self.max_context_tokens))
        separator = tokenizer.convert_ids_to_tokens(fmt.turn_end_id)
        if fmt.name == "chat_template":   # the template wrote the control tokens; the texts are defanged
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), [separator]
        head = tokenizer.decode(fmt.start_ids, skip_special_tokens=False) if fmt.start_ids else ""
        body, pieces = ids[len(fmt.start_ids):], []
        while body:
            end = body.index(fmt.turn_end_id) if fmt.turn_end_id in body else len(body)
            text = tokenizer.decode(body[:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(defang_markup(text, specials) + separator)
            body = body[end + 1:]
        return head + "".join(pieces), [separator]
