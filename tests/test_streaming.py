"""The parts under streaming and remote serving, one at a time: ReplyStream from the local
engine and from MMI, the edit throttle (with a hand-driven clock), the circuit breaker,
the OpenAI request mapping, the new config keys, and Discord's sharded client."""
from __future__ import annotations

import pytest

from bots.chat.splitting import split_message
from bots.chat.streaming import StreamedMessage
from bots.config import ConfigError, parse_config
from engine.model import load_model
from engine.serving.batcher import Engine
from engine.serving.breaker import CircuitBreaker, backoff_delays
from engine.serving.mmi import MMIEngine
from engine.serving.openai_backend import OpenAIEngine, public_url
from engine.serving.protocol import EngineUnavailable, ReplyEngine, SamplingParams
from tests.fakes.openai_api import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

LONG = SamplingParams(max_new_tokens=10, min_new_tokens=10, seed=5, finish_sentences=False)  # the tokens as drawn


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def dialogpt(tiny_dialogpt):
    return load_model(str(tiny_dialogpt))


# ---- ReplyStream from the local engine and MMI -----------------------------------------------
async def test_local_engine_streams_text_while_decoding(dialogpt):
    async with Engine(dialogpt, LONG) as engine:
        engine.stream_push_s = 0.0                # every step's text (the bot's engine: at most every 0.1 s)
        stream = engine.stream([("user", "hello there")])
        deltas = [delta async for delta in stream]
        whole = await engine.reply([("user", "hello there")])
    assert len(deltas) >= 2                       # text arrived step by step, not at the end
    assert stream.reply.text == whole.text        # same seed, same reply as reply()
    assert stream.reply.text.startswith("".join(deltas).strip()) and "".join(deltas).strip()


async def test_the_engine_pushes_the_first_words_at_once_and_then_no_more_often_than_its_interval(dialogpt):
    """Each push wakes the event loop (which then competes with the worker for the GIL), so
    streamed rows are handed text at most every `stream_push_s`; the first words never wait."""
    async with Engine(dialogpt, LONG) as engine:
        engine.stream_push_s = 60.0               # longer than the reply takes: only the first words are pushed
        streams = [engine.stream([("user", text)]) for text in ("hello there", "good night", "what is your name ?")]
        deltas = [[delta async for delta in s] for s in streams]  # read one after another: the others buffer
    for stream, got in zip(streams, deltas):
        assert len(got) == 1 and got[0].strip() and stream.reply.text.startswith(got[0].strip())
        assert stream.reply.new_tokens == 10      # …and the reply itself is whole


async def test_mmi_cannot_stream_and_yields_the_whole_reranked_reply_once(dialogpt):
    async with MMIEngine(Engine(dialogpt, LONG), dialogpt, candidates=3, weight=0.5) as mmi:
        stream = mmi.stream([("user", "hello there")])
        deltas = [delta async for delta in stream]
    assert deltas == [stream.reply.text]
    assert isinstance(mmi, ReplyEngine)


async def test_engine_errors_reach_the_stream_reader():
    async with OpenAIEngine("http://127.0.0.1:9/v1", "m", retries=0) as engine:   # port 9: nothing listens
        stream = engine.stream([("user", "hi")])
        with pytest.raises(EngineUnavailable):
            async for _ in stream:
                pass


# ---- the edit throttle ---------------------------------------------------------------------
class Recorder(StreamedMessage):
    def __init__(self, clock, limit=20):
        super().__init__(limit, interval_s=1.0, clock=clock)
        self.log = []

    async def send_first(self, text):
        self.log.append(("send", text, self.clock()))
        return "m1"

    async def edit(self, message, text):
        self.log.append(("edit", text, self.clock()))

    async def send_more(self, text):
        self.log.append(("more", text, self.clock()))
        return "m2"


async def test_edits_at_most_once_per_interval_and_the_final_text_is_whole():
    clock = Clock()
    shown = Recorder(clock, limit=30)
    await shown.show("Hello")                  # first words: sent at once
    clock.now += 0.5
    await shown.show("Hello there")            # too soon: skipped
    clock.now += 0.6
    await shown.show("Hello there my")         # 1.1 s after the send: edited
    await shown.show("Hello there my friend")  # too soon again: skipped
    clock.now += 1.0
    final = "Hello there my friend, how are you today? I am fine."
    sent = await shown.finish(final)
    parts = split_message(final, 30)
    assert len(parts) == 2
    assert shown.log == [("send", "Hello", 100.0), ("edit", "Hello there my", 100.0 + 1.1),
                         ("edit", parts[0], 100.0 + 2.1), ("more", parts[1], 100.0 + 2.1)]
    assert sent == ["m1", "m2"]


async def test_an_empty_start_sends_nothing_and_a_failed_send_falls_back_to_a_whole_reply():
    clock = Clock()
    shown = Recorder(clock)
    await shown.show("   ")
    assert not shown.started and shown.log == []

    class Broken(Recorder):
        async def send_first(self, text):
            raise OSError("network down")

    broken = Broken(clock)
    await broken.show("Hello")
    assert broken.broken and not broken.started   # the adapter then sends the reply normally


# ---- circuit breaker -------------------------------------------------------------------------
def test_breaker_opens_after_failures_lets_one_probe_through_and_closes_on_success():
    clock = Clock()
    breaker = CircuitBreaker(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow() and "down" in breaker.describe()
    clock.now += 30
    assert breaker.allow() and not breaker.allow()    # one probe at a time
    breaker.failure()                                  # the probe failed: open again, for a full cooldown
    assert breaker.state == "open" and breaker.retry_in() == 30
    clock.now += 30
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.describe() == "ok"
    assert backoff_delays(4, 0.5, cap_s=2) == [0.5, 1.0, 2, 2]


async def test_an_open_breaker_fails_fast_without_asking_the_backend():
    async with FakeOpenAI() as backend:
        clock = Clock()
        engine = OpenAIEngine(backend.base_url, backend.model, retries=0,
                              breaker=CircuitBreaker(failures=1, cooldown_s=60, clock=clock))
        async with engine:
            backend.fail_next(500)
            with pytest.raises(EngineUnavailable):
                await engine.reply([("user", "hi")])
            asked = len(backend.paths)
            with pytest.raises(EngineUnavailable, match="down"):
                await engine.reply([("user", "hi")])
            assert len(backend.paths) == asked        # nothing was sent
            clock.now += 60
            assert (await engine.reply([("user", "hi")])).text == backend.default_reply


async def test_a_400_is_not_retried_and_does_not_open_the_breaker():
    async with FakeOpenAI() as backend:
        async with OpenAIEngine(backend.base_url, "no-such-model", retries=3) as engine:
            with pytest.raises(RuntimeError, match="does not exist"):
                await engine.reply([("user", "hi")])
            assert len(backend.paths) == 1 and engine.breaker.state == "closed"


# ---- what is sent ------------------------------------------------------------------------------
def test_sampling_maps_onto_the_api_fields(dialogpt):
    engine = OpenAIEngine("http://user:pw@gpu-box:8000/v1", "served")
    params = SamplingParams(temperature=0.7, top_k=0, top_p=0.95, repetition_penalty=1.3, max_new_tokens=30,
                            min_new_tokens=2, seed=9, do_sample=False)
    body = engine.request_body([("user", "hi"), ("bot", "hello"), ("user", "how are you?")], params, "be brief")
    assert body["temperature"] == 0.0 and body["top_p"] == 0.95 and body["max_tokens"] == 30 and body["seed"] == 9
    assert body["extra_body"] == {"top_k": -1, "repetition_penalty": 1.3, "min_tokens": 2}
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    plain = OpenAIEngine("http://gpu-box:8000/v1", "served", extra_sampling=False)
    assert "extra_body" not in plain.request_body([("user", "hi")], SamplingParams())
    # completions in Mynah's dialogue format: turns joined by eos, eos stops the reply
    completions = OpenAIEngine("http://gpu-box:8000/v1", "served", fmt=dialogpt.fmt)
    body = completions.request_body([("user", "hi"), ("bot", "hello"), ("user", "how are you?")], SamplingParams())
    assert body["prompt"] == "hi<|endoftext|>hello<|endoftext|>how are you?<|endoftext|>"
    assert body["stop"] == ["<|endoftext|>"] and "messages" not in body
    assert public_url("http://user:pw@gpu-box:8000/v1") == "http://gpu-box:8000/v1"


# ---- config ------------------------------------------------------------------------------------
def test_config_checks_the_new_keys():
    config = parse_config({"engine": {"backend": "openai", "base_url": "http://gpu-box:8000/v1", "model": "m"},
                           "chat": {"stream": False, "default_persona": "kind"}, "discord": {"shards": "auto"}})
    assert config.engine.backend == "openai" and config.chat.default_persona == "kind"
    assert parse_config({}).chat.stream is True and parse_config({}).discord.shards == 1
    bad = [({"engine": {"backend": "openai", "model": "m"}}, "base_url"),
           ({"engine": {"backend": "openai", "base_url": "http://x/v1"}}, "model"),
           ({"engine": {"backend": "vllm"}}, "backend"),
           ({"discord": {"shards": 0}}, "shards"),
           ({"discord": {"shards": "many"}}, "shards"),
           ({"chat": {"stream_edit_seconds": 0}}, "stream_edit_seconds")]
    for raw, key in bad:
        with pytest.raises(ConfigError, match=key):
            parse_config(raw)


def test_discord_shards_pick_the_sharded_client():
    import discord

    from bots.platforms.discord.adapter import MynahBot, ShardedMynahBot, bot_class

    assert bot_class(1) == (MynahBot, {})
    assert bot_class("auto") == (ShardedMynahBot, {})
    assert bot_class(4) == (ShardedMynahBot, {"shard_count": 4})
    assert bot_class(4, [3, 1]) == (ShardedMynahBot, {"shard_count": 4, "shard_ids": [1, 3]})   # one worker's share
    assert issubclass(ShardedMynahBot, discord.AutoShardedClient) and issubclass(ShardedMynahBot, MynahBot)


@pytest.mark.parametrize("shards, ids", [("auto", [0]), (2, [2]), (2, [0, 0]), (2, [-1]), (2, ["0"]), (1, [True])])
def test_discord_shard_ids_must_name_distinct_shards_of_a_fixed_count(shards, ids):
    with pytest.raises(ConfigError, match="shard_ids"):
        parse_config({"discord": {"shards": shards, "shard_ids": ids}})
    assert parse_config({"discord": {"shards": 4, "shard_ids": [0, 2]}}).discord.shard_ids == [0, 2]


# ---- the local engine streams to Telegram too ----------------------------------------------------
async def test_local_engine_reply_is_streamed_to_telegram_and_stored_once(tmp_path, tiny_dialogpt):
    import sqlite3

    from bots.app import Mynah
    from bots.platforms.telegram.adapter import TelegramAdapter
    from tests.fakes.telegram_api import TOKEN, FakeTelegram

    telegram = await FakeTelegram().start()
    config = parse_config({"model": {"path": str(tiny_dialogpt)}, "storage": {"path": str(tmp_path / "db.sqlite3")},
                           "generation": {"max_new_tokens": 12, "min_new_tokens": 12, "seed": 2},
                           "chat": {"stream": True, "stream_edit_seconds": 0.2},
                           "telegram": {"base_url": telegram.base_url}})
    app = await Mynah.open(config)
    adapter = TelegramAdapter(app, TOKEN, poll_timeout=2, retry_delay=0.05)
    await adapter.start()
    try:
        update = telegram.message(601, "hello there")
        await telegram.wait_served(update)
        await adapter.wait_idle(30)
    finally:
        await adapter.stop()
        await app.close()
        await telegram.close()
    with sqlite3.connect(config.storage.path) as db:
        stored = db.execute("SELECT text, status, platform_message_id FROM messages WHERE role = 'bot'").fetchall()
    assert len(telegram.sent(601)) == 1                  # one message (drafts before it: tests/test_drafts.py)
    [(text, status, message_id)] = stored                # stored once, complete
    assert telegram.shown(601) == [text] and status == "ok"
    assert message_id == str(telegram.sent(601)[0].result["message_id"])
