"""Only the first-words rows of `mynah bench`'s through-the-bot part: N private chats at once, unstreamed then streamed.

    PYTHONPATH=. python -m scripts.bench.first_words --threads 1 [--cases gpt2:int8,gpt2:fp32,llama:int8] [--json F]

For each case a fresh `mynah run` behind the fake Telegram Bot API answers bursts of N new
chats (--rounds, one after another) with `[chat] stream = false` (the whole-reply p50/p95), then
another fresh one the same bursts with `stream = true` (the first visible words p50/p95 and the whole reply), back to back,
on the bench's random models with their real tokenizer (scripts/bench/tokenizer.py). The
ratio is issue 23's: first words p95 / the unstreamed whole-reply p95 (goal ≤ 25 %).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.bot import _start, _stats, _stop
from scripts.bench.config import BenchConfig


async def bursts(model: str, precision: str, cfg: BenchConfig, texts: list[str], stream: bool, rounds: int) -> list[dict]:
    """One fresh bot, `rounds` bursts of cfg.burst new chats one after another: per burst the first words and
    whole replies and the API calls' timeline. The first burst after start-up is the bot's first large batch
    (its KV buffer is new memory); later ones reuse it (engine/serving/fastpath/cache.py SpareBuffer)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="mynah-first-words-") as tmp:
        bot = await _start(model, precision, cfg, Path(tmp), stream)
        try:
            for round_ in range(rounds):
                since = time.monotonic()
                chats = [1000 * (round_ + 1) + i for i in range(cfg.burst)]
                for chat, text in zip(chats, texts):
                    bot.fake.message(chat, text)
                times = await asyncio.gather(*[bot.reply_times(c, since, stream) for c in chats])
                calls = [(c.method, round(c.at - since, 3)) for c in bot.fake.calls if c.at >= since]
                out.append({"first": _stats([f for f, _ in times]), "whole": _stats([w for _, w in times]),
                            "calls": calls})
        finally:
            await _stop(bot)
    for result in out:
        result["rss_peak_mb"] = bot.peak_rss_mb
    return out


def run_case(family: str, precision: str, cfg: BenchConfig, folder: Path, rounds: int) -> dict:
    from engine.dialogue import DialogueFormat
    from engine.model import load_tokenizer
    from scripts.bench.engine import make_prompts

    fmt = DialogueFormat(load_tokenizer(str(folder)))
    prompts = make_prompts(fmt, cfg.burst, cfg.context_tokens)
    texts = [p[-1][1] for p in prompts]
    tokens = [len(fmt.context_ids([("user", t)], 4096)) for t in texts]
    loads = [os.getloadavg()[0]]
    plain = asyncio.run(bursts(str(folder), precision, cfg, texts, False, rounds))
    streamed = asyncio.run(bursts(str(folder), precision, cfg, texts, True, rounds))
    loads.append(os.getloadavg()[0])
    return {"family": family, "precision": precision, "context_tokens_mean": sum(tokens) / len(tokens),
            "unstreamed": plain, "streamed": streamed, "loadavg": loads,
            "ratio": [s["first"]["p95_s"] / p["whole"]["p95_s"] for p, s in zip(plain, streamed)]}


def row(r: dict, round_: int) -> str:
    p, s, ratio = r["unstreamed"][round_], r["streamed"][round_], r["ratio"][round_]
    which = "first after start" if round_ == 0 else f"burst {round_ + 1}"
    return (f"| {r['family']} {r['precision']} | {which} | {r['context_tokens_mean']:.0f} | {s['first']['p50_s']:.2f} / "
            f"{s['first']['p95_s']:.2f} | {p['whole']['p95_s']:.2f} | {s['whole']['p95_s']:.2f} | "
            f"**{100 * ratio:.0f} %** | {'met' if ratio <= 0.25 else 'missed'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-threads", type=int, default=0, help="[engine] prefill_threads (0: spare cores too)")
    parser.add_argument("--chats", type=int, default=16)
    parser.add_argument("--cases", default="gpt2:int8,gpt2:fp32,llama:int8")
    parser.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "starter"])
    parser.add_argument("--rounds", type=int, default=2, help="bursts per fresh bot (the first comes right after start)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    from scripts.bench.engine import build_random_gpt2
    from scripts.bench.llama import build_random_llama

    cfg = BenchConfig(threads=args.threads, prefill_threads=args.prefill_threads, burst=args.chats, tokenizer=args.tokenizer)
    cases = [c.split(":") for c in args.cases.split(",")]
    results, started = [], time.perf_counter()
    print("| model, precision | burst | context tokens (mean) | first words p50 / p95 s | unstreamed whole p95 s "
          "| streamed whole p95 s | first words p95 / unstreamed p95 | ≤ 25 % |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mynah-first-words-models-") as tmp:
        folders: dict[str, Path] = {}
        for family, precision in cases:
            if family not in folders:
                folders[family] = (build_random_gpt2(Path(tmp) / family, "124m", tokenizer=args.tokenizer)
                                   if family == "gpt2" else build_random_llama(Path(tmp) / family, tokenizer=args.tokenizer)[0])
            results.append(run_case(family, precision, cfg, folders[family], args.rounds))
            for round_ in range(args.rounds):
                print(row(results[-1], round_), flush=True)
    print(f"{time.perf_counter() - started:.0f} s; load average {os.getloadavg()}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
