"""Where the bot's peak RSS comes from: memory at each start-up stage, and the bot's own peak.

    python -m scripts.bench.rss_stages stages gpt2 fp32   # in-process: RSS after each stage
    python -m scripts.bench.rss_stages bot smollm2 int8   # a real `mynah run` behind the fake Bot API

`stages` prints, after each stage (imports, load_model as the bot loads it — without transformers
where engine.lean can —, engine start with its decoder, the
first reply, 16 replies at once), RSS now (anonymous / file-backed) and the stage's own peak
(VmHWM, reset before each stage through /proc/self/clear_refs). `bot` runs the through-the-bot
measurement of `mynah bench` (scripts/bench/bot.py: learning loop on, unstreamed, one lone
reply then 16 chats at once) and prints the child's VmHWM. Models are random, of GPT-2 124M's
and SmolLM2-135M's shapes, saved once under $MYNAH_RSS_MODELS (default /tmp/mynah-rss-models).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from pathlib import Path

FOLDER = Path(os.environ.get("MYNAH_RSS_MODELS", "/tmp/mynah-rss-models"))
TEXTS = ["hello there, how are you today?", "what did you do at the weekend?", "tell me about your favourite film"]


def memory() -> dict:
    """RSS now, its anonymous and file-backed parts, and the peak since the last reset, MB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def model_path(family: str) -> str:
    """The random model of `family`'s shape, built (once) into FOLDER."""
    folder = FOLDER / family
    if not (folder / "config.json").exists():
        if family == "gpt2":
            from scripts.bench.engine import build_random_gpt2

            build_random_gpt2(folder)
        else:
            from scripts.bench.llama import build_random_llama

            build_random_llama(folder)
    return str(folder)


def stages(family: str, precision: str) -> None:
    path = model_path(family)
    rows = []

    def mark(name: str) -> None:
        m = memory()
        rows.append((name, m["VmRSS"], m["RssAnon"], m["RssFile"], m["VmHWM"]))
        reset_peak()

    mark("python")
    import torch  # noqa: F401

    from engine.serving.quantize import limit_malloc_arenas

    limit_malloc_arenas(1)  # as `mynah run` does
    mark("import torch")
    import bots.app  # noqa: F401
    import telegram.ext  # noqa: F401
    mark("import bots + PTB")
    from engine.lean import is_lean
    from engine.model import load_model
    from engine.serving.batcher import Engine
    from engine.serving.sampling import SamplingParams

    loaded = load_model(path, quantize="int8" if precision == "int8" else "none", lean=True)  # as the bot loads it
    mark("load_model (lean)" if is_lean(loaded.model) else "load_model (transformers)")
    params = SamplingParams(max_new_tokens=32, min_new_tokens=32)
    engine = Engine(loaded, params, max_batch_size=16, max_queue=80, max_context_tokens=256)

    async def run() -> None:
        async with engine:
            await asyncio.sleep(0.5)
            mark("engine started")
            await engine.reply([("user", TEXTS[0])])
            mark("first reply")
            await asyncio.gather(*[engine.reply([("user", TEXTS[i % 3] + f" {i}")]) for i in range(16)])
            mark("16 replies at once")
            await asyncio.sleep(1.5)  # the worker hands the burst's memory back when idle
            mark("idle")

    asyncio.run(run())
    print(f"{family} {precision}: MB  (stage peak = VmHWM since the previous row)")
    print(f"{'stage':22} {'RSS':>7} {'anon':>7} {'file':>7} {'stage peak':>10}")
    for name, rss, anon, file, peak in rows:
        print(f"{name:22} {rss:7.0f} {anon:7.0f} {file:7.0f} {peak:10.0f}")


def bot(family: str, precision: str) -> float:
    from scripts.bench.bot import _through_the_bot
    from scripts.bench.config import BenchConfig

    cfg = dataclasses.replace(BenchConfig(), lone_rounds=1, burst=16)
    path = model_path(family)
    started = time.perf_counter()
    out = asyncio.run(_through_the_bot(path, precision, cfg, TEXTS, stream=False))
    print(f"{family} {precision}: peak RSS of `mynah run` (VmHWM) {out['rss_peak_mb']:.0f} MB "
          f"(lone {out['lone']['p50_s']:.2f} s, 16 chats p95 {out['burst']['whole']['p95_s']:.2f} s, "
          f"{time.perf_counter() - started:.0f} s in all)")
    return out["rss_peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["stages", "bot"])
    parser.add_argument("family", choices=["gpt2", "smollm2"])
    parser.add_argument("precision", choices=["fp32", "int8"])
    args = parser.parse_args()
    (stages if args.what == "stages" else bot)(args.family, args.precision)


if __name__ == "__main__":
    main()
