"""Mynah's engine under the arrival patterns `mynah bench` compares with CTranslate2, and under a trainer.

- burst: N chats send one message at the same moment; the time until all N are answered
  (CTranslate2's counterpart: one batch of N);
- staggered: messages arrive at random times (exponential gaps, seeded, the same schedule
  for both engines); each reply's latency from its arrival. Continuous batching admits a
  message at the next step; a batching server waits for a window or for a running batch;
- while training: a lone chat's replies with a CPU-heavy child process running next to the
  engine, niced and single-threaded like the learning loop's trainer, with the engine told
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

# What the child does: dense matrix multiplies on one thread, as a fine-tuning step mostly does.
_BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


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


def _busy_child(nice: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _BUSY], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.nice(nice)) if nice and hasattr(os, "nice") else None)


def run_while_training(engine, prompts: list, replies: int, *, threads: int, threads_while_training: int,
                       nice: int) -> dict:
    """Lone replies quiet, with a busy child + set_threads (the shipped hook), and with the child alone."""
    def stats(latencies):
        return {"p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95), "replies": len(latencies),
                "all_s": latencies}

    out = {"threads": threads, "threads_while_training": threads_while_training, "nice": nice,
           "quiet": stats(_lone_replies(engine, prompts, replies))}
    for name, hook in (("training", True), ("training_no_hook", False)):
        child = _busy_child(nice)
        try:
            time.sleep(0.5)  # the child is up and multiplying
            if hook:
                engine.set_threads(threads_while_training)
            out[name] = stats(_lone_replies(engine, prompts, replies if hook else max(2, replies // 3)))
        finally:
            child.kill()
            child.wait()
            if hook:
                engine.set_threads(threads)
    out["ratio_p95"] = out["training"]["p95_s"] / out["quiet"]["p95_s"]
    out["ratio_p95_no_hook"] = out["training_no_hook"]["p95_s"] / out["quiet"]["p95_s"]
    return out
