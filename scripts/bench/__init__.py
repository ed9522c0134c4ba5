"""`mynah bench`: decode speed against the baselines, int8, memory, and storage under load.

    mynah bench                          # GPT-2 124M shape (random weights), full run (~10 min on 2 cores)
    mynah bench --quick                  # a tiny model, every part, under a minute (CI)
    mynah bench --model models/v0003     # your own model (quality numbers mean something here)
    mynah bench --markdown --json bench.json   # the table for docs/BENCHMARKS.md, raw numbers too

Measures in one run, on the same model and prompts: the GPT2-chitchat loop (no KV cache),
HF `generate` (one request at a time, and one batch), Mynah's engine with 1/8/16/32 chats
at once in fp32 and int8 (tokens/s, p50/p95 reply latency, RSS), CTranslate2 on the same
model (lone replies, a batch of 16 vs 16 chats at once, staggered arrivals; when installed),
the same through the bot (a real `mynah run` behind a local fake Telegram Bot API: lone
replies against the engine's own time, 16 chats streamed and not, first words, peak RSS),
a Llama of SmolLM2-135M's shape on the fast path vs transformers and CTranslate2,
chat latency next to a trainer-like child process, the memory-bandwidth
floor of batch-1 decoding, int8 quality against fp32, whether prefix KV reuse would pay,
and SQLite context fetch/logging with N stored messages. See scripts/bench/engine.py.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time

NAME = "bench"
HELP = "measure decode speed (vs GPT2-chitchat and HF generate), int8, memory and storage"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="", metavar="PATH",
                        help="model folder to measure (default: GPT-2 124M shape with random weights, built in memory)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens, in one process: a smoke run (< 1 min)")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (for docs/BENCHMARKS.md)")
    parser.add_argument("--json", default="", metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per reply (default 32; quick 8)")
    parser.add_argument("--context-tokens", type=int, default=None, help="prompt budget in tokens (default 64; quick 48)")
    parser.add_argument("--concurrency", type=_ints, default=None, metavar="N,N,…",
                        help="engine runs: chats at once (default 1,8,16,32; quick 1,8,32)")
    parser.add_argument("--precisions", default=None, metavar="fp32,int8", help="engine precisions (default fp32,int8)")
    parser.add_argument("--rounds", type=int, default=None, help="replies per chat in an engine run (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    parser.add_argument("--prefill-threads", type=int, default=0,
                        help="the engine's threads for a prefill (default 0: --threads plus the cores other processes "
                             "leave idle, as [engine] prefill_threads; 1 keeps every prefill on one thread)")
    parser.add_argument("--storage-messages", type=int, default=None, metavar="N",
                        help="messages stored for the storage part (default 1,000,000; quick 5,000; 0 skips it)")
    parser.add_argument("--no-pack", action="store_true",
                        help="engine fp32 without oneDNN weight packing (to see what packing gives)")
    parser.add_argument("--fast-path", default="auto", choices=["auto", "off"],
                        help="the engine's decoder: the hand-written GPT-2 step (auto) or transformers' forward (off)")
    parser.add_argument("--no-ct2", action="store_true", help="skip the CTranslate2 rows")
    parser.add_argument("--no-training", action="store_true", help="skip the while-training part")
    parser.add_argument("--no-bot", action="store_true", help="skip the through-the-bot rows (a real `mynah run`)")
    parser.add_argument("--no-llama", action="store_true", help="skip the Llama rows (SmolLM2-135M's shape)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every configuration in this process (faster start; RSS then adds up)")


def _config(args):
    from scripts.bench.config import BenchConfig

    overrides = {}
    for name, key in (("new_tokens", "new_tokens"), ("context_tokens", "context_tokens"),
                      ("concurrency", "concurrency"), ("rounds", "rounds")):
        value = getattr(args, name)
        if value is not None:
            overrides[key] = value
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        unknown = set(precisions) - {"fp32", "int8"}
        if unknown:
            raise SystemExit(f"mynah bench: unknown precision(s) {', '.join(sorted(unknown))}; use fp32 and/or int8")
        overrides["precisions"] = precisions
    overrides["threads"] = args.threads
    overrides["prefill_threads"] = args.prefill_threads
    if args.model:
        overrides["model"] = args.model
    if args.in_process:
        overrides["isolate"] = False
    if args.no_pack:
        overrides["pack_weights"] = False
    overrides["fast_path"] = args.fast_path
    if args.no_ct2:
        overrides["ct2"] = False
    if args.no_training:
        overrides["training_replies"] = 0
    if args.no_bot:
        overrides["bot"] = False
    if args.no_llama:
        overrides["llama"] = False
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    if 16 in cfg.concurrency and 1 not in cfg.concurrency:
        cfg.concurrency = [1] + cfg.concurrency
    return cfg


def run(args) -> int:
    from scripts.bench.engine import run_all

    cfg = _config(args)
    storage_messages = args.storage_messages if args.storage_messages is not None else (5_000 if args.quick else 1_000_000)
    command = "mynah bench " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("bench") + 1:]) \
        if "bench" in sys.argv else "mynah bench"
    progress = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    results = run_all(cfg, progress=progress)
    if storage_messages > 0:
        from scripts.bench.storage import bench_storage

        progress(f"storage: loading {storage_messages:,} messages …")
        results["storage"] = asyncio.run(bench_storage(storage_messages))
    results["command"] = command
    results["seconds"] = time.perf_counter() - started
    print(render(results, args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


def render(results: dict, markdown: bool) -> str:
    from scripts.bench.report import format_report
    from scripts.bench.storage import format_storage

    parts = [f"command: `{results.get('command', 'mynah bench')}` ({results['seconds']:.0f} s)", "",
             format_report(results, markdown)]
    if "storage" in results:
        parts += ["", format_storage(results["storage"], markdown)]
    return "\n".join(parts)
