"""What `mynah bench` measures: decode paths, the engine under load, int8, memory.

Everything runs on the same model and the same prompts:

- the GPT2-chitchat loop: a full forward pass over the whole sequence at every step (no
  KV cache), batch 1, top-k sampling (GPT2-chitchat's interact.py);
- Hugging Face ``generate``, one request at a time, and one left-padded batch of 32;
- Mynah's engine (continuous batching) with 1, 8, 16 and 32 chats talking at once, each
  chat sending its next message as soon as it has the reply, in fp32 and in int8;
- memory read bandwidth and the batch-1 floor it sets (weight bytes / bandwidth);
- int8 quality against fp32 (next-token agreement, held-out loss);
- whether reusing a chat's KV cache across turns (prefix reuse) would pay.

Each configuration can run in a process of its own (``isolate``), so its RSS is its own;
a worker is ``python -m scripts.bench.engine '<case as JSON>'`` and prints one JSON line.
This module makes the inputs and runs the cases; the measurements live next to it
(decode.py, quality.py, prefix.py, machine.py), the tables in report.py, and the storage
part in storage.py (the engine never imports storage).

Without a model path the model is GPT-2 124M's shape (GPT2Config() defaults) with random
weights and a real tokenizer (scripts/bench/tokenizer.py: SmolLM2's 49,152 ids), built in memory
and saved to a temporary folder: speed does not depend on the weights. Quality numbers are only
meaningful for a trained model (``--model PATH``).
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine.types import max_positions
from scripts.bench.config import SHAPES, BenchConfig
from scripts.bench.tokenizer import dialogue_tokenizer, real_tokenizer
from scripts.bench.bot import available as bot_available
from scripts.bench.ct2 import available
from scripts.bench.decode import make_engine, run_chitchat_loop, run_engine, run_hf_generate
from scripts.bench.machine import machine, measure_bandwidth, peak_rss_mb, rss_anon_mb, rss_mb, rss_sampler
from scripts.bench.prefix import measure_prefix_reuse
from scripts.bench.quality import measure_quality


# --------------------------------------------------------------------------- model & prompts

def build_random_gpt2(folder: str | Path, shape: str = "124m", seed: int = 0, tokenizer: str = "smollm2") -> Path:
    """Save a randomly initialised GPT-2 of the given shape + a real tokenizer (a normal HF folder).

    The vocabulary is the tokenizer's size (SmolLM2's 49,152 ids: GPT-2's own 50,257-id BPE is
    not available offline, and this one is the same kind and within 2 % of its size, so the
    output head costs the same); turns are joined by <|endoftext|> as in GPT-2 dialogue models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tok = dialogue_tokenizer(real_tokenizer(tokenizer)[0])
    config = GPT2Config(**{**SHAPES[shape], "vocab_size": len(tok)}, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def chitchat_dialogues(limit: int | None = None) -> list[list[str]]:
    """Held-out dialogues of chitchat-dataset: the 2% split by conversation with seed 0.

    The starter model held out exactly these; a model trained with `mynah train`'s default
    5% split (same seed, same shuffle) held out a superset of them.
    """
    from engine.training.data import read_chitchat_dataset, split_by_conversation

    _, valid = split_by_conversation(list(read_chitchat_dataset()), 0.02, 0)
    return valid[:limit] if limit else valid


def make_prompts(fmt, count: int, context_tokens: int, dialogues: list[list[str]] | None = None) -> list[list[tuple[str, str]]]:
    """`count` chat histories from held-out dialogues, each filling most of `context_tokens`.

    A history is the start of a dialogue (user and bot alternating, ending on a user
    turn) long enough to fill the budget; the engine and the baselines see the same ids.
    """
    prompts = []
    for dialogue in dialogues if dialogues is not None else chitchat_dialogues():
        turns: list[tuple[str, str]] = []
        for i, text in enumerate(dialogue):
            turns.append(("user" if i % 2 == 0 else "bot", text))
            if turns[-1][0] == "user" and len(fmt.context_ids(turns, 10 * context_tokens)) >= context_tokens:
                break
        while turns and turns[-1][0] != "user":
            turns.pop()
        if turns and len(fmt.context_ids(turns, context_tokens)) >= context_tokens * 2 // 3:
            prompts.append(turns)
        if len(prompts) == count:
            return prompts
    while len(prompts) < count:  # a tiny corpus: reuse histories with a twist so no two are equal
        prompts.append(prompts[len(prompts) % max(1, len(prompts))][:-1] + [("user", f"and {len(prompts)}?")])
    return prompts


# --------------------------------------------------------------------------- cases

def run_case(case: dict) -> dict:
    """One configuration, measured in this process. case["kind"]: baselines | engine | bot | ct2 | quality | bandwidth."""
    from engine.model import load_model
    from engine.serving.sampling import SamplingParams
    from engine.serving.quantize import weight_bytes

    cfg = BenchConfig(**case["config"])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    kind = case["kind"]
    result: dict = {"kind": kind, "loadavg_before": list(os.getloadavg())}
    if kind == "ct2":
        result.update(_ct2_case(case, cfg))
    elif kind == "bot":
        from scripts.bench.bot import bot_case

        result.update(bot_case(case, cfg))
    elif kind == "bandwidth":
        result.update(measure_bandwidth())
    elif kind == "quality":
        result.update(measure_quality(case["path"], case["heldout"]))
        result.update({"rss_peak_mb": peak_rss_mb()})
    elif kind in ("baselines", "engine"):
        precision = case.get("precision", "fp32")
        if kind == "engine":
            _import_the_bot()  # so the engine process holds what a running bot holds besides its model
        rss_before = rss_mb()
        loaded = load_model(case["path"], quantize="int8" if precision == "int8" else "none")
        positions = max_positions(loaded.model)
        prompts = [[tuple(turn) for turn in p] for p in case["prompts"]]
        budget = min(cfg.context_tokens, positions - cfg.new_tokens)
        prompt_ids = [loaded.fmt.context_ids(p, budget) for p in prompts]
        result.update({"precision": precision, "parameters": loaded.parameters, "weight_bytes": weight_bytes(loaded.model),
                       "rss_process_start_mb": rss_before, "rss_loaded_mb": rss_mb(), "rss_anon_loaded_mb": rss_anon_mb(),
                       "context_tokens_mean": statistics.fmean(len(p) for p in prompt_ids)})
        runs = {}

        def measured(name: str, fn) -> None:
            with rss_sampler() as rss:
                runs[name] = fn()
            runs[name]["rss_mb"] = rss["max_mb"]
            runs[name]["rss_anon_mb"] = rss["max_anon_mb"]

        if kind == "baselines":
            if cfg.chitchat_prompts:
                measured("chitchat", lambda: run_chitchat_loop(loaded, prompt_ids[:cfg.chitchat_prompts], cfg.new_tokens))
            measured("hf1", lambda: run_hf_generate(loaded, prompt_ids[:cfg.hf_prompts], cfg.new_tokens, SamplingParams(), 1))
            if cfg.hf_batch > 1:
                measured("hf_batch", lambda: run_hf_generate(loaded, prompt_ids[:cfg.hf_batch], cfg.new_tokens,
                                                             SamplingParams(), cfg.hf_batch))
        else:
            engine = make_engine(loaded, cfg)
            engine.start()
            run_engine(engine, prompts, 1, 1)  # the engine's start-up (fp32: packing the weights) stays out of the runs
            result["rss_started_mb"] = rss_mb()
            try:
                for n in cfg.concurrency:
                    rounds = cfg.lone_rounds if n == 1 else cfg.rounds
                    measured(f"engine{n}", lambda: run_engine(engine, prompts, n, rounds))
                _arrival_runs(engine, prompts, cfg, case, runs, measured)
                result["decoder"] = engine._decoder.name
            finally:
                asyncio.run(engine.stop())
            result["packed"] = bool(getattr(loaded, "packed", False))
            if case.get("conversations"):
                lone = runs.get("engine1")
                runs["prefix"] = measure_prefix_reuse(loaded, cfg.new_tokens, cfg.max_history_turns, cfg.max_context_tokens,
                                                      case["conversations"],
                                                      step_s=lone["step_ms"] / 1000 if lone else None)
        result.update({"runs": runs, "rss_peak_mb": peak_rss_mb(),
                       "rss_serving_max_mb": max(r.get("rss_mb", 0) for r in runs.values()),
                       "rss_anon_serving_max_mb": max(r.get("rss_anon_mb", 0) for r in runs.values())})
    else:
        raise ValueError(f"unknown bench case {kind!r}")
    result["loadavg_after"] = list(os.getloadavg())
    return result


def _import_the_bot() -> None:
    """The bot's own libraries (platform clients, scheduler, SQLite, the learning loop), as `mynah run` imports them."""
    import importlib

    for name in ("bots.app", "bots.learning.loop", "telegram.ext", "discord", "apscheduler.schedulers.asyncio",
                 "aiosqlite"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _arrival_runs(engine, prompts, cfg: BenchConfig, case: dict, runs: dict, measured) -> None:
    """Burst, staggered arrivals (CTranslate2's schedule when it ran) and the trainer-contention part."""
    from scripts.bench.arrivals import arrival_times, run_burst, run_staggered, run_while_training

    if cfg.burst:
        measured(f"burst{cfg.burst}", lambda: run_burst(engine, prompts, cfg.burst, cfg.burst_reps))
    if cfg.stagger_requests:
        arrivals = case.get("arrivals")
        lone = runs.get("engine1")
        if not arrivals and lone:
            arrivals = arrival_times(cfg.stagger_requests, cfg.stagger_gap * lone["p50_s"])
        if arrivals:
            runs["staggered"] = run_staggered(engine, prompts, arrivals)
    if case.get("training") and cfg.training_replies:
        runs["training"] = run_while_training(engine, prompts, cfg.training_replies, threads=cfg.threads,
                                              threads_while_training=cfg.threads_while_training, nice=cfg.trainer_nice,
                                              model_path=case["path"])


def _ct2_case(case: dict, cfg: BenchConfig) -> dict:
    from transformers import AutoConfig

    from engine.dialogue import DialogueFormat
    from engine.model import load_tokenizer
    from engine.serving.sampling import SamplingParams
    from scripts.bench.ct2 import run_ct2

    fmt = DialogueFormat(load_tokenizer(case["path"]))
    positions = getattr(AutoConfig.from_pretrained(case["path"]), "n_positions", 1024)
    budget = min(cfg.context_tokens, positions - cfg.new_tokens)
    prompt_ids = [fmt.context_ids([tuple(t) for t in p], budget) for p in case["prompts"]]
    with tempfile.TemporaryDirectory(prefix="mynah-ct2-") as tmp:
        return run_ct2(case["path"], tmp, case["precision"], prompt_ids, cfg, SamplingParams())


def prepare_inputs(cfg: BenchConfig, path: str) -> dict:
    """Prompts and dialogues every case uses, made once here (with the model's tokenizer only)."""
    from engine.dialogue import DialogueFormat
    from engine.training.data import read_chitchat_dataset
    from engine.model import load_tokenizer

    fmt = DialogueFormat(load_tokenizer(path))
    count = max(max(cfg.concurrency) * cfg.rounds, cfg.lone_rounds, cfg.chitchat_prompts, cfg.hf_prompts, cfg.hf_batch)
    heldout = chitchat_dialogues()
    corpus = heldout + [d for d in read_chitchat_dataset() if d not in heldout][:2000]
    return {"prompts": make_prompts(fmt, count, cfg.context_tokens, corpus),
            "heldout": heldout[:cfg.quality_dialogues],
            "conversations": heldout[:cfg.prefix_conversations]}


def plan(cfg: BenchConfig, path: str, inputs: dict) -> list[dict]:
    """The cases of one bench run, in order."""
    base = {"config": asdict(cfg), "path": path}

    cases = [{**base, "kind": "bandwidth"}, {**base, "kind": "baselines", "prompts": inputs["prompts"]}]
    for i, precision in enumerate(cfg.precisions):
        if cfg.ct2 and not available():  # CTranslate2 just before Mynah, so the two see the same machine load
            cases.append({**base, "kind": "ct2", "precision": precision, "prompts": inputs["prompts"]})
        cases.append({**base, "kind": "engine", "precision": precision, "prompts": inputs["prompts"],
                      "conversations": inputs["conversations"] if i == 0 else [], "training": i == 0})
        if cfg.bot and not bot_available() and (cfg.shape != "tiny" or i == 0):  # a real `mynah run`, right after
            cases.append({**base, "kind": "bot", "precision": precision, "prompts": inputs["prompts"]})
    if "int8" in cfg.precisions and cfg.quality_dialogues > 0:
        cases.append({**base, "kind": "quality", "heldout": inputs["heldout"]})
    return cases


def run_all(cfg: BenchConfig, progress=print) -> dict:
    """Every case of `plan`, isolated in worker processes when cfg.isolate; returns all results."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mynah-bench-") as tmp:
        if cfg.model:
            from engine.model import resolve_path

            path = resolve_path(cfg.model)
            model_name = cfg.model
        else:
            progress(f"building a random GPT-2 ({cfg.shape}) with {cfg.tokenizer}'s tokenizer …")
            path = str(build_random_gpt2(Path(tmp) / f"gpt2-{cfg.shape}", cfg.shape, tokenizer=cfg.tokenizer))
            model_name = f"random GPT-2 {cfg.shape} shape, {_vocab(path):,} ids"
        results = {"machine": machine(), "config": asdict(cfg), "model": model_name, "cases": []}
        inputs = prepare_inputs(cfg, path)
        if cfg.ct2 and available():
            progress(f"no CTranslate2 rows: {available()}")
        if cfg.bot and bot_available():
            progress(f"no through-the-bot rows: {bot_available()}")
        _run_cases(plan(cfg, path, inputs), results["cases"], cfg, progress)
        if cfg.llama:
            from scripts.bench.llama import build_random_llama, plan_llama

            progress(f"building a random Llama of SmolLM2-135M's shape with {cfg.tokenizer}'s tokenizer …")
            llama_path, source = build_random_llama(Path(tmp) / "llama", quick=cfg.shape == "tiny", tokenizer=cfg.tokenizer)
            results["llama"] = {"model": f"random Llama, {'tiny' if cfg.shape == 'tiny' else 'SmolLM2-135M'} shape",
                                "shape_source": source, "cases": []}
            prompts = prepare_inputs(cfg, str(llama_path))["prompts"]
            _run_cases(plan_llama(cfg, str(llama_path), prompts), results["llama"]["cases"], cfg, progress)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = time.perf_counter() - started
    return results


def _vocab(path: str) -> int:
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["vocab_size"]


def _run_cases(cases: list[dict], out: list[dict], cfg: BenchConfig, progress) -> None:
    arrivals: dict[str, list[float]] = {}
    for case in cases:
        label = case.get("family", "") + " " * bool(case.get("family")) + case["kind"] + \
            (f" {case['precision']}" if "precision" in case else "")
        progress(f"running {label} …")
        t = time.perf_counter()
        if case["kind"] == "engine" and case["precision"] in arrivals:
            case["arrivals"] = arrivals[case["precision"]]  # the schedule CTranslate2 just had
        out.append(_run_isolated(case) if cfg.isolate else run_case(case))
        if case["kind"] == "ct2" and "staggered" in out[-1]:
            arrivals[case["precision"]] = out[-1]["staggered"]["arrivals"]
        progress(f"  {label} took {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.2f})")


def _run_isolated(case: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error")
    root = str(Path(__file__).resolve().parents[2])  # the project root (this file is scripts/bench/engine.py)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.engine"], input=json.dumps(case), capture_output=True,
                          text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {case['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m scripts.bench.engine` reads a case as JSON on stdin, prints the result as one JSON line."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    argv = sys.argv[1:] if argv is None else argv
    result = run_case(json.loads(argv[0] if argv else sys.stdin.read()))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
