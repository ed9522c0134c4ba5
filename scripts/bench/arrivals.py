"""Mynah's engine under the arrival patterns `mynah bench` compares with CTranslate2, and under a trainer.

- burst: N chats send one message at the same moment; the time until all N are answered
  (CTranslate2's counterpart: one batch of N);
- staggered: messages arrive at random times (exponential gaps, seeded, the same schedule
  for both engines); each reply's latency from its arrival. Continuous batching admits a
  message at the next step; a batching server waits for a window or for a running batch;
- while training: a lone chat's replies with a child process fine-tuning the same model
  next to the engine (AdamW on random 8 x 128-token batches: the trainer's work without its
  data export), niced and single-threaded like the learning loop's trainer, with the engine told
  what the learning loop tells it (`set_threads([engine] threads_while_training)`), and
  once more with the engine left alone, against the same replies on a quiet machine.
"""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import time

from engine.types import percentile

# What the child does: fine-tune the model on one thread, as engine.training.finetune does.
_TRAIN = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
vocab = model.config.vocab_size
print("ready", flush=True)
while True:
    ids = torch.randint(0, vocab, (8, 128))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
"""


def arrival_times(count: int, mean_gap_s: float, seed: int = 0) -> list[float]:
    """`count` arrival times (seconds from the start) with exponential gaps of mean `mean_gap_s`."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        out.append(t)
        t += rng.expovariate(1.0 / mean_gap_s)
    return out


def run_burst(engine, prompts: list, n: int, reps: int) -> dict:
    """n chats at once, one message each, `reps` times: the median time until all n are answered."""
    async def main() -> list[float]:
        seconds = []
        for r in range(reps):
            group = prompts[r * n:(r + 1) * n] or prompts[:n]
            t = time.perf_counter()
            await asyncio.gather(*[engine.reply(p) for p in group])
            seconds.append(time.perf_counter() - t)
        return seconds

    seconds = asyncio.run(main())
    return {"n": n, "seconds": statistics.median(seconds), "all_s": seconds}


def run_staggered(engine, prompts: list, arrivals: list[float]) -> dict:
    async def main() -> dict:
        latencies: list[float] = []
        start = time.perf_counter()

        async def one(k: int) -> None:
            await asyncio.sleep(max(0.0, arrivals[k] - (time.perf_counter() - start)))
            t = time.perf_counter()
            await engine.reply(prompts[k % len(prompts)])
            latencies.append(time.perf_counter() - t)

        await asyncio.gather(*[one(k) for k in range(len(arrivals))])
        return {"p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95), "replies": len(latencies),
                "seconds": time.perf_counter() - start}

    return asyncio.run(main())


def _lone_replies(engine, prompts: list, count: int) -> list[float]:
    async def main() -> list[float]:
        out = []
        for p in prompts[:count]:
            t = time.perf_counter()
            await engine.reply(p)
            out.append(time.perf_counter() - t)
        return out

    return asyncio.run(main())


def _busy_child(nice: int, model_path: str) -> subprocess.Popen:
    """The trainer-like child, started and past its model load (it prints "ready")."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    child = subprocess.Popen([sys.executable, "-c", _TRAIN, model_path], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                             preexec_fn=(lambda: os.nice(nice)) if nice and hasattr(os, "nice") else None)
    child.stdout.readline()  # "ready" (or "" if it died: the run then measures a quiet machine, see ratio)
    time.sleep(1.0)  # a few training steps under way
    return child


def run_while_training(engine, prompts: list, replies: int, *, threads: int, threads_while_training: int,
                       nice: int, model_path: str) -> dict:
    """Lone replies: quiet; next to a fine-tuning child paused while the engine works (the shipped
    default, bots.learning.quiet); with the engine on `threads_while_training` threads instead;
    with neither."""
    from bots.learning.quiet import TrainerQuiet

    def stats(latencies):
        return {"p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95), "replies": len(latencies),
                "all_s": latencies}

    out = {"threads": threads, "threads_while_training": threads_while_training, "nice": nice,
           "quiet": stats(_lone_replies(engine, prompts, replies))}
    for name in ("paused", "one_thread", "nothing"):
        child = _busy_child(nice, model_path)
        quiet = TrainerQuiet(engine, None, pause=name == "paused")
        try:
            quiet.started(child.pid)
            if name == "one_thread":
                engine.set_threads(threads_while_training)
            out[name] = stats(_lone_replies(engine, prompts, replies if name != "nothing" else max(2, replies // 3)))
            out[name]["child_alive"] = child.poll() is None
        finally:
            quiet.ended()
            child.kill()
            child.wait()
            if name == "one_thread":
                engine.set_threads(threads)
    for name in ("paused", "one_thread", "nothing"):
        out[name]["ratio_p95"] = out[name]["p95_s"] / out["quiet"]["p95_s"]
    return out
