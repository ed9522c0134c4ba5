"""CTranslate2 on the same model, for `mynah bench`'s comparison rows (needs `pip install mynah[bench]`).

The HF folder is converted with ctranslate2's own converter (int8 or float32 weights), and the
same prompt ids go in as tokens of its vocabulary, with the bot's sampling settings (top-k
40, top-p 0.9, temperature 0.8, repetition penalty 1.2) and exactly `new_tokens` new tokens
per reply. Measured:

- lone replies: one `generate_batch` of one prompt after another (p50/p95 latency);
- a batch of N: one `generate_batch` call on N prompts (the wall time until all are done);
- staggered arrivals: prompts arrive at given times; a server loop collects what has
  arrived within a batching window after the first waiting prompt (or until N are waiting),
  runs them as one batch, and repeats — once per window, so the best window can be picked.
  (CTranslate2's Generator runs one batch at a time; it cannot add a prompt to a running one.)
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from engine.types import percentile


def available() -> str:
    """"" when ctranslate2 can be imported, else why not."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as exc:
        return f"ctranslate2 is not installed (pip install 'mynah[bench]'): {exc}"
    return ""


def convert(model_path: str, out: str | Path, precision: str) -> str:
    from ctranslate2.converters import TransformersConverter

    out = str(out)
    TransformersConverter(model_path).convert(out, quantization="int8" if precision == "int8" else "float32", force=True)
    return out


class _Ct2:
    def __init__(self, folder: str, precision: str, threads: int, new_tokens: int, params):
        import json

        import ctranslate2

        self.generator = ctranslate2.Generator(folder, device="cpu", compute_type="int8" if precision == "int8" else "float32",
                                               intra_threads=threads or os.cpu_count() or 1, inter_threads=1)
        with open(Path(folder) / "vocabulary.json", encoding="utf-8") as f:
            self.vocab = json.load(f)
        self.kwargs = dict(max_length=new_tokens, min_length=new_tokens, include_prompt_in_result=False,
                           sampling_topk=params.top_k, sampling_topp=params.top_p,
                           sampling_temperature=params.temperature, repetition_penalty=params.repetition_penalty)

    def tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def run(self, batch: list[list[str]]) -> int:
        results = self.generator.generate_batch(batch, **self.kwargs)
        return sum(len(r.sequences_ids[0]) for r in results)


def staggered(serve, prompts: list, arrivals: list[float], window: float, max_batch: int) -> dict:
    """A batching server in real time: `serve(list of prompts)` runs one batch; returns latencies."""
    latencies: list[float] = []
    start = time.perf_counter()
    i, n = 0, len(arrivals)
    while i < n:
        now = time.perf_counter() - start
        if arrivals[i] > now:
            time.sleep(arrivals[i] - now)
            continue
        last = min(i + max_batch, n) - 1  # the batch is full once this one has arrived
        wake = min(arrivals[i] + window, arrivals[last])
        if wake > now:
            time.sleep(wake - now)
        now = time.perf_counter() - start
        j = i
        while j < n and j - i < max_batch and arrivals[j] <= now:
            j += 1
        serve(prompts[i:j])
        end = time.perf_counter() - start
        latencies += [end - arrivals[k] for k in range(i, j)]
        i = j
    return {"window_s": window, "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "replies": len(latencies), "seconds": time.perf_counter() - start}


def run_ct2(model_path: str, workdir: str, precision: str, prompt_ids: list[list[int]], cfg, params) -> dict:
    """Every CTranslate2 measurement for one precision (see the module docstring).

    The staggered schedule's mean gap is cfg.stagger_gap × CTranslate2's own lone-reply p50
    (messages arrive faster than one-at-a-time serving keeps up with); the schedule is
    returned so Mynah's engine gets the very same one.
    """
    from scripts.bench.arrivals import arrival_times

    started = time.perf_counter()
    folder = convert(model_path, Path(workdir) / f"ct2-{precision}", precision)
    convert_s = time.perf_counter() - started
    ct = _Ct2(folder, precision, cfg.threads, cfg.new_tokens, params)
    prompts = [ct.tokens(ids) for ids in prompt_ids]
    ct.run(prompts[:1])  # warm-up
    lone = []
    for p in prompts[:cfg.lone_rounds]:
        t = time.perf_counter()
        ct.run([p])
        lone.append(time.perf_counter() - t)
    bursts = []
    for r in range(cfg.burst_reps):
        t = time.perf_counter()
        made = ct.run(prompts[r * cfg.burst:(r + 1) * cfg.burst] or prompts[:cfg.burst])
        bursts.append(time.perf_counter() - t)
    out = {"precision": precision, "convert_s": convert_s,
           "lone": {"p50_s": percentile(lone, 0.5), "p95_s": percentile(lone, 0.95), "replies": len(lone)},
           "burst": {"n": cfg.burst, "seconds": statistics.median(bursts), "all_s": bursts, "tokens": made}}
    if cfg.stagger_requests:
        mean_gap = cfg.stagger_gap * out["lone"]["p50_s"]
        arrivals = arrival_times(cfg.stagger_requests, mean_gap)
        runs = [staggered(ct.run, prompts, arrivals, w, cfg.burst) for w in cfg.stagger_windows]
        out["staggered"] = {"runs": runs, "best": min(runs, key=lambda r: r["p95_s"]), "arrivals": arrivals,
                            "mean_gap_s": mean_gap, "max_batch": cfg.burst}
    return out
