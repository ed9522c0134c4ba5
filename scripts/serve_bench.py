"""Tokens/s through Mynah's ReplyEngine, local or remote, for docs/SCALING.md.

    python -m scripts.serve_bench --model engine/starter                      # local engine, CPU
    python -m scripts.serve_bench --model /models/DialoGPT-medium --device cuda
    python -m scripts.serve_bench --model /models/DialoGPT-medium \\
        --base-url http://127.0.0.1:8000/v1 --served dialogpt                  # the same model on vLLM
    python -m scripts.serve_bench --fake                                       # Mynah's own overhead per
                                                                               # remote reply (fake server)

N chats at once (--concurrency 1,32), each asking for one reply of exactly --new-tokens
tokens (min = max, so every engine writes the same amount), streamed or not (--stream);
tokens/s = all generated tokens / wall time of the burst, after one warm-up reply. Remote
replies count the chunks the server streamed (one per token on vLLM) or its usage field.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="starter", help="local model folder (also the tokenizer for completions)")
    p.add_argument("--device", default="auto", help="local engine device: auto, cpu, cuda")
    p.add_argument("--base-url", default="", help="an OpenAI-compatible server: measure it instead of the local engine")
    p.add_argument("--served", default="", help="the served model name (with --base-url)")
    p.add_argument("--api", default="completions", choices=("completions", "chat"))
    p.add_argument("--fake", action="store_true", help="measure against tests/fakes/openai_api.py (no model at all)")
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="ask for streamed replies (ReplyEngine.stream)")
    return p.parse_args(argv)


async def burst(engine, n: int, tokens: int, stream: bool) -> tuple[float, float]:
    overrides = {"max_new_tokens": tokens, "min_new_tokens": tokens}

    async def one(i: int):
        turns = [("user", f"hello, this is chat number {i}. how are you today?")]
        if stream:
            return await engine.stream(turns, {**overrides, "seed": i}).result()
        return await engine.reply(turns, {**overrides, "seed": i})

    await one(-1)  # warm-up
    started = time.perf_counter()
    replies = await asyncio.gather(*[one(i) for i in range(n)])
    wall = time.perf_counter() - started
    return sum(r.new_tokens for r in replies) / wall, wall


async def build(args):
    from engine.serving.openai_backend import OpenAIEngine

    if args.fake:
        from tests.fakes.openai_api import FakeOpenAI

        fake = await FakeOpenAI().start()
        fake.default_reply = " ".join(f"w{i}" for i in range(args.new_tokens))
        return OpenAIEngine(fake.base_url, fake.model, max_in_flight=10_000), fake
    if args.base_url:
        fmt = None
        if args.api == "completions":
            from engine.dialogue import DialogueFormat
            from engine.model import load_tokenizer, resolve_path

            fmt = DialogueFormat(load_tokenizer(resolve_path(args.model)))
        return OpenAIEngine(args.base_url, args.served or args.model, fmt=fmt, max_in_flight=10_000), None
    from engine.model import load_model
    from engine.serving.batcher import Engine

    loaded = load_model(args.model, device=args.device)
    return Engine(loaded, max_batch_size=args.max_batch_size, max_queue=10_000), None


async def main(argv=None) -> int:
    args = parse_args(argv)
    engine, fake = await build(args)
    where = "fake server" if args.fake else (args.base_url or f"local engine ({args.device})")
    try:
        async with engine:
            for n in [int(x) for x in args.concurrency.split(",")]:
                tps, wall = await burst(engine, n, args.new_tokens, args.stream)
                print(f"{where}, {args.model}, {n} chats, {args.new_tokens} tokens each"
                      f"{', streamed' if args.stream else ''}: {tps:,.0f} tokens/s ({wall:.2f} s)", flush=True)
    finally:
        if fake is not None:
            await fake.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
