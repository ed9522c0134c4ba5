"""`mynah bench`'s through-the-bot rows: a real `mynah run` process against a local fake Telegram Bot API.

What a user feels is the time from their message reaching Telegram to the bot's reply
appearing, not the engine's own time. So this part starts the project's fake Bot API
(tests/fakes/telegram_api.py, an aiohttp server on 127.0.0.1 speaking the real protocol
to the real python-telegram-bot client), writes a config pointing `[telegram] base_url`
at it, starts `mynah run` as a child process (the learning loop on, as shipped) and
measures, with every reply exactly `new_tokens` tokens long:

- lone replies: one message at a time, each in a fresh private chat; the time from the
  update being queued to the bot's final message (sendMessage, or the last edit of a
  streamed reply), next to the engine's own time for the same message in this process;
- N chats at once: N private chats send one message at the same moment; per-chat
  whole-reply latency (p50/p95, and until all are answered) and the time to the first
  visible words (the first draft, message or edit), with streaming off and on;
- the child's peak RSS (VmHWM) over the whole run.

The fake lives with the tests, so these rows need a source checkout; elsewhere they are
skipped with a note. Timings are from the fake's clock (when each API call arrived).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bots.chat.service import BUSY_TEXT, ERROR_TEXT, UNAVAILABLE_TEXT
from engine.types import percentile

ROOT = Path(__file__).resolve().parents[2]
SHOWN = ("sendMessageDraft", "sendMessage", "editMessageText")  # calls that put reply words on the screen
FINAL = ("sendMessage", "editMessageText")
APOLOGIES = (BUSY_TEXT, ERROR_TEXT, UNAVAILABLE_TEXT)  # what the bot sends when it has no reply


def available() -> str:
    """"" when the fake Bot API can be imported (a source checkout), else why not."""
    try:
        _fake_bot_api()
    except ImportError as exc:
        return f"the fake Telegram Bot API (tests/fakes) is not importable here: {exc}"
    return ""


def _fake_bot_api():
    """The fake Bot API's module (tests/fakes/telegram_api.py).

    The `mynah` console script does not put the checkout on sys.path, so `mynah bench` from a
    checkout would drop the through-the-bot rows; the checkout's root is added when it holds
    the fakes."""
    if (ROOT / "tests" / "fakes" / "telegram_api.py").is_file() and str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    import tests.fakes.telegram_api as fake

    return fake


def write_config(folder: Path, model_path: str, precision: str, cfg, base_url: str, stream: bool) -> Path:
    """A `mynah run` config: this model and precision, fixed-length replies, the learning loop on."""
    lines = [
        "[model]", f'path = "{model_path}"',
        "[generation]", f"max_new_tokens = {cfg.new_tokens}", f"min_new_tokens = {cfg.new_tokens}",
        f"max_context_tokens = {cfg.max_context_tokens}",
        "[engine]", f'quantize = "{"int8" if precision == "int8" else "none"}"', f"threads = {cfg.threads}",
        f"prefill_threads = {cfg.prefill_threads}",
        f'fast_path = "{cfg.fast_path}"',
        "[storage]", f'path = "{folder / "bot.sqlite3"}"',
        "[chat]", f"stream = {'true' if stream else 'false'}", "rate_limit_messages = 1000",
        "[telegram]", f'base_url = "{base_url}"',
        "[learning]", "enabled = true", f'registry = "{folder / "models"}"',
    ]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _Bot:
    """The fake Bot API and a `mynah run` child talking to it."""

    def __init__(self, fake, proc):
        self.fake, self.proc = fake, proc
        self.peak_rss_mb = None

    async def reply_times(self, chat: int, since: float, stream: bool, timeout: float = 600.0) -> tuple[float, float]:
        """(first words, whole reply) seconds after `since` for the next reply in `chat`."""
        fake = self.fake

        def calls(methods):
            return [c for c in fake.calls if c.method in methods and c.at >= since and c.status == 200
                    and str(c.params.get("chat_id")) == str(chat)]

        await fake.wait_for(lambda: calls(("sendMessage",)), timeout=timeout)
        if stream:  # a streamed reply is done when its message has not changed for a while
            quiet = 2.5
            while True:
                last = max(c.at for c in calls(FINAL))
                if time.monotonic() - last > quiet:
                    break
                await asyncio.sleep(0.25)
        apology = next((c.params.get("text") for c in calls(FINAL) if c.params.get("text") in APOLOGIES), None)
        if apology:  # a bot that failed answers fast: that would read as speed
            raise RuntimeError(f"the bot under test answered chat {chat} with an apology, not a reply: {apology!r}")
        first = min(c.at for c in calls(SHOWN)) - since
        final = max(c.at for c in calls(FINAL)) - since
        return first, final

    async def ask(self, chats: list[int], texts: list[str], stream: bool) -> list[tuple[float, float]]:
        since = time.monotonic()
        for chat, text in zip(chats, texts):
            self.fake.message(chat, text)
        return list(await asyncio.gather(*[self.reply_times(c, since, stream) for c in chats]))


async def _start(model_path: str, precision: str, cfg, folder: Path, stream: bool) -> _Bot:
    fake_api = _fake_bot_api()
    fake = await fake_api.FakeTelegram().start()
    config = write_config(folder, model_path, precision, cfg, fake.base_url, stream)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""),
               TELEGRAM_BOT_TOKEN=fake_api.TOKEN, TOKENIZERS_PARALLELISM="false")
    env.pop("DISCORD_BOT_TOKEN", None)
    log = open(folder / "bot.log", "wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "scripts.cli", "--config", str(config), "run",
                                                stdout=log, stderr=log, env=env, cwd=str(ROOT))
    bot = _Bot(fake, proc)
    try:
        await bot.ask([1], ["hello there"], stream)  # start-up (loading, packing) stays out of the numbers
    except Exception:
        await _stop(bot)
        raise RuntimeError("the bot did not answer:\n" + (folder / "bot.log").read_text(errors="replace")[-3000:])
    return bot


async def _stop(bot: _Bot) -> None:
    bot.peak_rss_mb = _peak_rss_mb(bot.proc.pid)
    if bot.proc.returncode is None:
        bot.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(bot.proc.wait(), 60)
        except asyncio.TimeoutError:
            bot.proc.kill()
            await bot.proc.wait()
    await bot.fake.close()


def _stats(values: list[float]) -> dict:
    return {"p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95), "max_s": max(values),
            "all_s": values}


async def _through_the_bot(model_path: str, precision: str, cfg, texts: list[str], stream: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="mynah-bench-bot-") as tmp:
        bot = await _start(model_path, precision, cfg, Path(tmp), stream)
        out: dict = {"stream": stream}
        try:
            if not stream:  # lone replies are measured unstreamed (the engine row's counterpart)
                lone = [(await bot.ask([100 + i], [texts[i % len(texts)]], stream))[0] for i in range(cfg.lone_rounds)]
                out["lone"] = _stats([final for _, final in lone])
            n = cfg.burst
            burst = await bot.ask([1000 + i for i in range(n)], [texts[i % len(texts)] for i in range(n)], stream)
            out["burst"] = {"n": n, "whole": _stats([f for _, f in burst]), "first": _stats([f for f, _ in burst])}
        finally:
            await _stop(bot)
        out["rss_peak_mb"] = bot.peak_rss_mb
    return out


def engine_alone(model_path: str, precision: str, cfg, texts: list[str]) -> dict:
    """The engine's own time for the lone replies' messages (same model, precision, tokens), in this process."""
    from engine.model import load_model
    from scripts.bench.decode import make_engine

    loaded = load_model(model_path, quantize="int8" if precision == "int8" else "none")
    engine = make_engine(loaded, cfg)

    async def main() -> list[float]:
        async with engine:
            await engine.reply([("user", "hello there")])  # warm-up, as the bot's first message
            times = []
            for i in range(cfg.lone_rounds):
                t = time.perf_counter()
                await engine.reply([("user", texts[i % len(texts)])])
                times.append(time.perf_counter() - t)
            return times

    return _stats(asyncio.run(main()))


def bot_case(case: dict, cfg) -> dict:
    """Through-the-bot measurements for one precision (a bench case of kind "bot")."""
    texts = [p[-1][1] for p in case["prompts"]]
    result = {"precision": case["precision"], "engine": engine_alone(case["path"], case["precision"], cfg, texts)}
    for stream in (False, True):
        key = "streamed" if stream else "unstreamed"
        result[key] = asyncio.run(_through_the_bot(case["path"], case["precision"], cfg, texts, stream))
    return result


def bot_rows(cases: list[dict], family: str = "") -> tuple[list[list[str]], list[dict]]:
    """Rows of the through-the-bot table and the issue-23 targets they decide (`cases`: one model's)."""
    rows, targets = [], []
    for case in (c for c in cases if c["kind"] == "bot"):
        precision, engine, plain, streamed = case["precision"], case["engine"], case["unstreamed"], case["streamed"]
        ct = next((c for c in cases if c["kind"] == "ct2" and c["precision"] == precision), None)
        p = f"{family} {precision}".strip()
        n = plain["burst"]["n"]
        tax = plain["lone"]["p50_s"] / engine["p50_s"]
        rows.append(["lone reply, p50 (engine alone on the same message)", p, f"{plain['lone']['p50_s']:.2f}",
                     f"{engine['p50_s']:.2f}", f"{tax:.2f}"])
        for label, run in ((f"{n} chats at once, stream = false", plain), (f"{n} chats at once, stream = true", streamed)):
            b = run["burst"]
            rows.append([f"{label}: whole reply p50 / p95 / all answered", p,
                         f"{b['whole']['p50_s']:.2f} / {b['whole']['p95_s']:.2f} / {b['whole']['max_s']:.2f}", "", ""])
        rows.append([f"{n} chats at once, stream = true: first words p50 / p95", p,
                     f"{streamed['burst']['first']['p50_s']:.2f} / {streamed['burst']['first']['p95_s']:.2f}", "", ""])
        rows.append(["peak RSS of `mynah run` (learning loop on), MB", p, f"{plain['rss_peak_mb']:.0f}", "", ""])
        targets.append({"target": f"{p}: a lone reply through the bot within 10 % of the engine's own time",
                        "value": f"{plain['lone']['p50_s']:.2f} s vs {engine['p50_s']:.2f} s = {tax:.2f}×", "met": tax <= 1.1})
        if ct:
            for label, mine, theirs in (("lone reply", plain["lone"]["p50_s"], ct["lone"]["p50_s"]),
                                        (f"{n} chats at once vs a batch of {n}", plain["burst"]["whole"]["max_s"],
                                         ct["burst"]["seconds"])):
                targets.append({"target": f"{p}: {label} through the bot ≤ 1.0× CTranslate2",
                                "value": f"{mine:.2f} s vs {theirs:.2f} s = {mine / theirs:.2f}×", "met": mine <= theirs})
        ratio = streamed["burst"]["whole"]["p95_s"] / plain["burst"]["whole"]["p95_s"]
        targets.append({"target": f"{p}: streamed whole-reply p95 at {n} chats ≤ 1.2× unstreamed",
                        "value": f"{streamed['burst']['whole']['p95_s']:.2f} s vs {plain['burst']['whole']['p95_s']:.2f} s "
                                 f"= {ratio:.2f}×", "met": ratio <= 1.2})
        first = streamed["burst"]["first"]["p95_s"] / plain["burst"]["whole"]["p95_s"]
        targets.append({"target": f"{p}: first words p95 at {n} chats ≤ 25 % of the unstreamed whole-reply p95",
                        "value": f"{streamed['burst']['first']['p95_s']:.2f} s vs {plain['burst']['whole']['p95_s']:.2f} s "
                                 f"= {100 * first:.0f} %", "met": first <= 0.25})
        limit = 500 if precision == "int8" else 1024
        targets.append({"target": f"{p}: peak RSS of the bot ≤ {limit} MB", "value": f"{plain['rss_peak_mb']:.0f} MB",
                        "met": plain["rss_peak_mb"] <= limit})
    return rows, targets


def format_bot(results: dict, table) -> list[str]:
    rows, targets = bot_rows(results["cases"])
    llama = results.get("llama")
    if llama:
        more = bot_rows(llama["cases"], "Llama")
        rows, targets = rows + more[0], targets + more[1]
    if not rows:
        return []
    model = results.get("model", "") + (f" and {llama['model']}" if llama else "")
    lines = ["", f"through the bot ({model}: a real `mynah run` behind a local fake Telegram Bot API; "
                 "seconds from the update to the reply on screen; ratio = bot / engine):", ""]
    lines += table(["run", "precision", "bot s", "engine s", "ratio"], rows)
    lines += ["", "targets (issue 23, through the bot):", ""]
    lines += table(["target", "measured", "met"], [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in targets])
    return lines
