"""`mynah generate`: print samples, unconditional or from a prompt (the gpt-2 repo's
generate_unconditional_samples.py, through Mynah's own engine and sampler).

    mynah generate --nsamples 5 --length 40                     # unconditional
    mynah generate --prompt "hi , how are you ?" --nsamples 3 --temperature 0.9 --top-k 40
    mynah generate --prompt "hello" --prompt "hi there" --stop-at-turn-end   # a 2-turn context
    mynah generate --prompt "do you like dogs ?" --mmi-model models/mmi --mmi-candidates 8

All samples are decoded together in the engine's batch (sample i uses seed SEED + i; with
MMI, SEED + i * N, its N candidates taking the N seeds from there).
--length N makes every sample exactly N tokens long, as the gpt-2 script does (the end of
turn is suppressed until then); with --stop-at-turn-end it is a maximum and a sample ends
with its turn. Unconditional samples start from the format's start of dialogue
(<|endoftext|> for DialoGPT/GPT-2 models; for GPT2-chitchat, [CLS] plus an empty turn).
"""
from __future__ import annotations

import asyncio
import json
import random
import sys

NAME = "generate"
HELP = "print sample replies from a model, unconditional or from a prompt"


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder (default: [model] path in config)")
    parser.add_argument("--format", default=None, choices=["auto", "dialogpt", "chitchat", "chat_template"],
                        help="dialogue format (default: [model] format in config)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a context turn; repeat for several turns (oldest first); none: unconditional")
    parser.add_argument("--nsamples", type=int, default=1, help="how many samples (default 1)")
    parser.add_argument("--batch-size", type=int, default=0, help="engine batch size (default: all samples at once, up to 32)")
    parser.add_argument("--length", type=int, default=None,
                        help="tokens per sample (default: [generation] max_new_tokens, ending with the turn)")
    parser.add_argument("--stop-at-turn-end", action="store_true", help="--length is a maximum: end a sample with its turn")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0: off")
    parser.add_argument("--top-p", type=float, default=None, help="1.0: off")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="1.0: off")
    parser.add_argument("--seed", type=int, default=None, help="sample i uses SEED + i (default: random)")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    parser.add_argument("--mmi-model", default=None, metavar="PATH",
                        help="rerank each sample from --mmi-candidates with this backward model")
    parser.add_argument("--mmi-candidates", type=int, default=None, help="default: [generation] mmi_candidates")
    parser.add_argument("--mmi-weight", type=float, default=None, help="default: [generation] mmi_weight")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample instead of text blocks")


def sampling_overrides(args, config) -> dict:
    """Per-request settings from the command line (None: the config's value)."""
    out = {}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        value = getattr(args, name)
        if value is not None:
            out[name] = value
    if args.length is not None:
        out["max_new_tokens"] = args.length
        out["min_new_tokens"] = 1 if args.stop_at_turn_end else args.length
    elif not args.stop_at_turn_end:
        out["min_new_tokens"] = min(config.generation.min_new_tokens, config.generation.max_new_tokens)
    if args.greedy:
        out["do_sample"] = False
    return out


def check_args(args) -> str | None:
    if args.nsamples < 1:
        return "--nsamples must be 1 or more"
    if args.length is not None and args.length < 1:
        return "--length must be 1 or more"
    if args.temperature is not None and args.temperature <= 0:
        return "--temperature must be greater than 0"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return "--top-p must be in (0, 1]"
    if args.top_k is not None and args.top_k < 0:
        return "--top-k must be 0 (off) or more"
    if args.repetition_penalty is not None and args.repetition_penalty < 1:
        return "--repetition-penalty must be 1.0 (off) or more"
    if args.mmi_weight is not None and not 0 <= args.mmi_weight <= 1:
        return "--mmi-weight must be in [0, 1]"
    return None


async def generate(args, config) -> list[dict]:
    from bots.app import build_engine
    from engine.serving.mmi import MMIEngine
    from engine.model import load_model

    m = config.model
    fmt = args.format or m.format
    loaded = await asyncio.to_thread(load_model, args.model or m.path, fmt=fmt, device=m.device,
                                     quantize=config.engine.quantize)
    engine = build_engine(config, loaded)
    engine.max_batch_size = args.batch_size if args.batch_size > 0 else min(32, args.nsamples)
    stride = 1  # sample i uses seed base + i * stride: MMI candidates use stride seeds each
    if args.mmi_model:
        backward = await asyncio.to_thread(load_model, args.mmi_model, device=m.device, quantize=config.engine.quantize)
        g = config.generation
        n = args.mmi_candidates or max(2, g.mmi_candidates)
        engine.max_batch_size = max(engine.max_batch_size, min(64, n * args.nsamples))
        stride = n
        engine = MMIEngine(engine, backward, candidates=n,
                           weight=g.mmi_weight if args.mmi_weight is None else args.mmi_weight)
    # an empty first turn: the context is just the start of a dialogue (<|endoftext|> for GPT-2)
    turns = [("user" if (len(args.prompt) - i) % 2 else "bot", t) for i, t in enumerate(args.prompt)] or [("user", "")]
    overrides = sampling_overrides(args, config)
    base = args.seed if args.seed is not None else random.randrange(2**31)
    async with engine:
        replies = await asyncio.gather(*[engine.reply(turns, {**overrides, "seed": base + i * stride})
                                         for i in range(args.nsamples)])
    return [{"sample": i + 1, "seed": base + i * stride, "tokens": r.new_tokens, "text": r.text, "fallback": r.fallback,
             "model_version": r.model_version} for i, r in enumerate(replies)]


def run(args) -> int:
    from bots.config import load_config
    from engine.model import ModelLoadError

    problem = check_args(args)
    if problem:
        print(f"mynah: {problem}", file=sys.stderr)
        return 2
    config = load_config(args.config)
    try:
        samples = asyncio.run(generate(args, config))
    except (ModelLoadError, ValueError, RuntimeError) as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    for s in samples:
        if args.json:
            print(json.dumps(s, ensure_ascii=False))
        else:
            print("=" * 40 + f" SAMPLE {s['sample']} ({s['tokens']} tokens) " + "=" * 40)
            print(s["text"])
    if not args.json:
        print("=" * 80)
    return 0
