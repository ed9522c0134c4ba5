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
a worker is ``python -m scripts.bench.engine '<case as JSON>'`` and prints one JSON line. The
storage part lives in scripts/bench/storage.py (the engine never imports storage).

Without a model path the model is GPT-2 124M's shape (GPT2Config() defaults) with random
weights and a byte-level tokenizer of GPT-2's 50,257 ids, built in memory and saved to a
temporary folder: speed does not depend on the weights. Quality numbers are only
meaningful for a trained model (``--model PATH``).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SHAPES = {
    "124m": {},  # GPT2Config() defaults: 12 layers, 768 wide, 12 heads, 1024 positions, 50,257 ids
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256},
}


@dataclass
class BenchConfig:
    model: str = ""                  # a model folder; "" builds the random GPT-2 shape below
    shape: str = "124m"              # 124m | tiny (random weights; --quick uses tiny)
    new_tokens: int = 32             # tokens per reply (every reply runs to exactly this many)
    context_tokens: int = 64         # prompt budget (whole turns, newest kept)
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 16, 32])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    rounds: int = 2                  # replies per chat in an engine run (each chat waits for its reply)
    lone_rounds: int = 4             # replies of the 1-chat run
    chitchat_prompts: int = 2        # replies of the GPT2-chitchat loop (it is slow)
    hf_prompts: int = 4              # replies of HF generate, one at a time
    hf_batch: int = 32               # one HF generate call on this many prompts (0: skip)
    quality_dialogues: int = 80      # held-out dialogues for int8 vs fp32 (the 2% split has 80)
    prefix_conversations: int = 80   # held-out dialogues replayed for the prefix-reuse estimate
    threads: int = 0                 # torch threads (0: torch's default, one per core)
    isolate: bool = True             # each configuration in its own process (own RSS)
    pack_weights: bool = True        # the engine's default: fp32 linear weights pre-packed for oneDNN
    max_history_turns: int = 6       # the chat defaults, for the prefix-reuse estimate
    max_context_tokens: int = 256

    @classmethod
    def quick(cls, **overrides) -> "BenchConfig":
        base = dict(shape="tiny", new_tokens=8, context_tokens=48, concurrency=[1, 8, 32], rounds=1, lone_rounds=2,
                    chitchat_prompts=2, hf_prompts=2, hf_batch=8, quality_dialogues=8, prefix_conversations=8,
                    isolate=False)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- model & prompts

def byte_tokenizer(vocab_size: int = 50257):
    """A byte-level tokenizer with GPT-2's id count: 256 byte ids, filler ids, eos last.

    Text encodes one id per byte (no merges); the filler ids decode to two bytes each,
    so anything a random model samples can be decoded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size - 1:
                break
            vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = vocab_size - 1
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_random_gpt2(folder: str | Path, shape: str = "124m", seed: int = 0) -> Path:
    """Save a randomly initialised GPT-2 of the given shape + byte tokenizer (a normal HF folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tok = byte_tokenizer()
    config = GPT2Config(**SHAPES[shape], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
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


# --------------------------------------------------------------------------- machine facts

def rss_mb() -> float:
    """Resident set size of this process now (Linux), MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def rss_anon_mb() -> float:
    """The anonymous part of RSS (heap, tensors), MB: RSS without shared libraries and mapped files."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1e3
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """The process's high-water mark (VmHWM), MB: includes transients such as loading fp32 before int8."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@contextmanager
def rss_sampler(period_s: float = 0.02):
    """Largest RSS seen while the block runs (sampled), as holder["max_mb"]."""
    holder = {"max_mb": rss_mb(), "max_anon_mb": rss_anon_mb()}
    stop = threading.Event()

    def watch():
        while not stop.wait(period_s):
            holder["max_mb"] = max(holder["max_mb"], rss_mb())
            holder["max_anon_mb"] = max(holder["max_anon_mb"], rss_anon_mb())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield holder
    finally:
        stop.set()
        thread.join()
        holder["max_mb"] = max(holder["max_mb"], rss_mb())


def measure_bandwidth(mb: int = 512, repeats: int = 5) -> dict:
    """Memory read bandwidth: best time to sum a tensor far larger than the caches (GB/s).

    Also reports copy bandwidth (read + write). Runs with the current torch thread count.
    """
    n = mb * 1_000_000 // 4
    data = torch.ones(n, dtype=torch.float32)
    out = torch.empty_like(data)
    data.sum()
    best_read = best_copy = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        data.sum()
        best_read = min(best_read, time.perf_counter() - t)
        t = time.perf_counter()
        out.copy_(data)
        best_copy = min(best_copy, time.perf_counter() - t)
    del data, out
    return {"read_gb_s": n * 4 / best_read / 1e9, "copy_gb_s": 2 * n * 4 / best_copy / 1e9, "tensor_mb": mb,
            "threads": torch.get_num_threads()}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in load]}


# --------------------------------------------------------------------------- decode paths

def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _latency_stats(latencies: list[float]) -> dict:
    return {"p50_s": _percentile(latencies, 0.5), "p95_s": _percentile(latencies, 0.95), "replies": len(latencies)}


@torch.inference_mode()
def run_chitchat_loop(loaded, prompt_ids: list[list[int]], new_tokens: int, top_k: int = 8) -> dict:
    """GPT2-chitchat's interact.py: the whole sequence through the model at every step, batch 1.

    Its defaults: top-k 8, temperature 1, no repetition penalty, [UNK] never sampled. Every
    reply runs to `new_tokens` (the stop token is masked) so all paths make the same tokens.
    """
    model, fmt = loaded.model, loaded.fmt
    banned = sorted(set(fmt.banned_ids) | set(fmt.stop_ids))
    latencies, made = [], 0
    started = time.perf_counter()
    for ids in prompt_ids:
        t = time.perf_counter()
        seq = torch.tensor([ids], device=loaded.device)
        for _ in range(new_tokens):
            logits = model(input_ids=seq).logits[0, -1, :].float()
            logits[banned] = -float("inf")
            kth = torch.topk(logits, top_k).values[-1]
            logits[logits < kth] = -float("inf")
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1)
            seq = torch.cat([seq, token[None, :]], dim=1)
            made += 1
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    return {"tokens": made, "seconds": total, "tok_s": made / total, "decode_tok_s": made / total,
            **_latency_stats(latencies)}


def _sampling_kwargs(params) -> dict:
    return dict(do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                repetition_penalty=params.repetition_penalty)


@torch.inference_mode()
def run_hf_generate(loaded, prompt_ids: list[list[int]], new_tokens: int, params, batch: int = 1) -> dict:
    """HF `generate` on `batch` prompts per call (left-padded), calls one after another.

    Prefill is timed by the same call with one new token, so decode tok/s leaves it out.
    """
    model, fmt = loaded.model, loaded.fmt
    pad = fmt.pad_id
    kwargs = _sampling_kwargs(params)

    def encode(group):
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=loaded.device)
        return ids, mask

    def generate(ids, mask, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=pad, **kwargs)

    groups = [prompt_ids[i:i + batch] for i in range(0, len(prompt_ids), batch)]
    generate(*encode(groups[0][:1]), 2)  # warm-up
    latencies, made, prefill_s = [], 0, 0.0
    started = time.perf_counter()
    for group in groups:
        ids, mask = encode(group)
        t = time.perf_counter()
        out = generate(ids, mask, new_tokens)
        latencies += [time.perf_counter() - t] * len(group)
        made += (out.shape[1] - ids.shape[1]) * len(group)
    total = time.perf_counter() - started
    for group in groups:  # prefill alone, for decode tok/s
        ids, mask = encode(group)
        t = time.perf_counter()
        generate(ids, mask, 1)
        prefill_s += time.perf_counter() - t
    decode_tokens = made - sum(len(g) for g in groups)
    return {"tokens": made, "seconds": total, "tok_s": made / total, "batch": batch,
            "decode_tok_s": decode_tokens / max(1e-9, total - prefill_s), "prefill_s": prefill_s,
            **_latency_stats(latencies)}


def make_engine(loaded, cfg: "BenchConfig"):
    """One engine for every concurrency level of a run (one worker thread, as in the bot)."""
    from engine.serving.batcher import Engine
    from engine.serving.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens)
    top = max(cfg.concurrency)
    return Engine(loaded, params, max_batch_size=top, max_queue=4 * top + 8, max_context_tokens=cfg.context_tokens,
                  threads=cfg.threads, pack_weights=cfg.pack_weights)


def run_engine(engine, prompts: list, concurrency: int, rounds: int) -> dict:
    """`concurrency` chats at once, each sending `rounds` messages, the next as soon as its reply came.

    `engine` is started. tok/s counts every generated token over the wall time (prefills
    included); decode tok/s counts the tokens of decode steps over the time spent in them
    (the engine's own timing).
    """
    async def chat(i: int, latencies: list[float]) -> int:
        made = 0
        for r in range(rounds):
            prompt = prompts[(i * rounds + r) % len(prompts)]
            t = time.perf_counter()
            reply = await engine.reply(prompt)
            latencies.append(time.perf_counter() - t)
            made += reply.new_tokens
        return made

    async def main() -> dict:
        await engine.reply(prompts[0], {"max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        for key in engine.timing:
            engine.timing[key] = 0
        latencies: list[float] = []
        started = time.perf_counter()
        made = sum(await asyncio.gather(*[chat(i, latencies) for i in range(concurrency)]))
        total = time.perf_counter() - started
        timing = dict(engine.timing)
        return {"tokens": made, "seconds": total, "tok_s": made / total, "concurrency": concurrency,
                "decode_tok_s": timing["decode_rows"] / max(1e-9, timing["decode_s"]),
                "step_ms": 1000 * timing["decode_s"] / max(1, timing["decode_steps"]),
                "mean_batch": timing["decode_rows"] / max(1, timing["decode_steps"]),
                "prefill_s": timing["prefill_s"], **_latency_stats(latencies)}

    return asyncio.run(main())


# --------------------------------------------------------------------------- int8 quality

@torch.inference_mode()
def _token_stats(model, windows: list[list[int]], pad_id: int) -> tuple[list[torch.Tensor], list[float]]:
    """Per window: argmax next-token ids and per-token losses."""
    argmaxes, losses = [], []
    for ids in windows:
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        target = x[0, 1:]
        argmaxes.append(logits.argmax(-1))
        losses += torch.nn.functional.cross_entropy(logits, target, reduction="none").tolist()
    return argmaxes, losses


def measure_quality(path: str, dialogues: list[list[str]], max_len: int = 128) -> dict:
    """int8 against fp32 on held-out dialogues: next-token agreement and mean loss per token."""
    from engine.model import load_model

    fp32 = load_model(path)
    fmt = fp32.fmt
    limit = min(max_len, getattr(fp32.model.config, "n_positions", max_len))
    windows = []
    for d in dialogues:
        ids = fmt.dialogue_ids(d)[:limit]
        if len(ids) >= 8:
            windows.append(ids)
    ref_argmax, ref_loss = _token_stats(fp32.model, windows, fmt.pad_id)
    del fp32
    int8 = load_model(path, quantize="int8")
    q_argmax, q_loss = _token_stats(int8.model, windows, fmt.pad_id)
    agree = sum(int((a == b).sum()) for a, b in zip(ref_argmax, q_argmax))
    total = sum(len(a) for a in ref_argmax)
    return {"windows": len(windows), "tokens": total, "agreement": agree / max(1, total),
            "loss_fp32": statistics.fmean(ref_loss), "loss_int8": statistics.fmean(q_loss)}


# --------------------------------------------------------------------------- prefix reuse

@torch.inference_mode()
def measure_prefix_reuse(loaded, new_tokens: int, max_history_turns: int, max_context_tokens: int,
                         conversations: list[list[str]], repeats: int = 3, step_s: float | None = None) -> dict:
    """Would keeping a chat's KV cache between its turns pay?

    1. How often it applies: replay held-out dialogues turn by turn through the chat's
       context rule (last `max_history_turns` messages, `max_context_tokens`) and count
       the bot turns whose context starts with the previous context + the previous reply.
    2. What it saves when it applies: prefill of the whole context vs prefill of only the
       new tokens on top of the cached prefix (batch 1, timed).
    """
    fmt, model = loaded.fmt, loaded.model
    turns_total = reusable = 0
    saved_tokens = full_tokens = 0
    sample_pair = None
    for dialogue in conversations:
        history: list[tuple[str, str]] = []
        previous: list[int] | None = None
        for i, text in enumerate(dialogue):
            role = "user" if i % 2 == 0 else "bot"
            if role == "bot":  # the bot answers here: this is a generation
                context = fmt.context_ids(history[-max_history_turns:], max_context_tokens)
                turns_total += 1
                full_tokens += len(context)
                if previous is not None and len(previous) < len(context) and context[:len(previous)] == previous:
                    reusable += 1
                    saved_tokens += len(previous)
                    if sample_pair is None or len(previous) > len(sample_pair[0]):
                        sample_pair = (previous, context)
                previous = context + fmt.encode_text(text) + [fmt.turn_end_id]  # what the cache would hold
            history.append((role, text))
    result = {"bot_turns": turns_total, "reusable_turns": reusable,
              "reusable_fraction": reusable / max(1, turns_total),
              "prefill_tokens_saved_fraction": saved_tokens / max(1, full_tokens)}
    if sample_pair is None:
        return result
    prefix, context = sample_pair
    dev = loaded.device
    import inspect

    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def best(fn, setup=lambda: None) -> float:
        times = []
        for _ in range(repeats):
            arg = setup()
            t = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t)
        return min(times)

    cache_kwarg = getattr(loaded, "cache_kwarg", None) or (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values")
    full = best(lambda _: model(input_ids=torch.tensor([context], device=dev), use_cache=True, **keep))
    cached = model(input_ids=torch.tensor([prefix], device=dev), use_cache=True, **keep)
    cache = getattr(cached, cache_kwarg, None) or cached.past_key_values
    suffix_ids = torch.tensor([context[len(prefix):]], device=dev)
    suffix_pos = torch.arange(len(prefix), len(context), device=dev)[None, :]
    part = best(lambda c: model(input_ids=suffix_ids, position_ids=suffix_pos, use_cache=True,
                                **{cache_kwarg: c}, **keep),
                setup=lambda: _copy_cache(cache))
    if step_s is None:  # no engine timing at hand: a 1-token pass on the cached prefix
        step_s = best(lambda c: model(input_ids=suffix_ids[:, :1], position_ids=suffix_pos[:, :1], use_cache=True,
                                      **{cache_kwarg: c}), setup=lambda: _copy_cache(cache))
    step = step_s
    reply_s = full + new_tokens * step  # a lone reply: prefill + decode steps (rough, batch 1)
    kv_bytes = 2 * model.config.n_layer * model.config.n_embd * 4 * len(context) if hasattr(model.config, "n_layer") else 0
    result.update({"example_prefix_tokens": len(prefix), "example_context_tokens": len(context),
                   "prefill_full_ms": 1000 * full, "prefill_suffix_ms": 1000 * part,
                   "saving_per_reusable_reply": (full - part) / reply_s,
                   "expected_saving_per_reply": result["reusable_fraction"] * (full - part) / reply_s,
                   "kv_mb_per_chat": kv_bytes / 1e6})
    return result


def _copy_cache(cache):
    from engine.serving import kvcache

    import copy

    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers] if hasattr(cache, "layers") else clone.layers
    for layer in kvcache.layers(clone):
        layer.keys = layer.keys.clone()
        layer.values = layer.values.clone()
    return clone


# --------------------------------------------------------------------------- cases

def run_case(case: dict) -> dict:
    """One configuration, measured in this process. case["kind"]: baselines | engine | quality | bandwidth."""
    from engine.model import load_model
    from engine.serving.sampling import SamplingParams
    from engine.serving.quantize import weight_bytes

    cfg = BenchConfig(**case["config"])
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    kind = case["kind"]
    result: dict = {"kind": kind, "loadavg_before": list(os.getloadavg())}
    if kind == "bandwidth":
        result.update(measure_bandwidth())
    elif kind == "quality":
        result.update(measure_quality(case["path"], case["heldout"]))
        result.update({"rss_peak_mb": peak_rss_mb()})
    elif kind in ("baselines", "engine"):
        precision = case.get("precision", "fp32")
        rss_before = rss_mb()
        loaded = load_model(case["path"], quantize="int8" if precision == "int8" else "none")
        config = loaded.model.config
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024)
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
        cases.append({**base, "kind": "engine", "precision": precision, "prompts": inputs["prompts"],
                      "conversations": inputs["conversations"] if i == 0 else []})
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
            progress(f"building a random GPT-2 ({cfg.shape}) with a byte-level tokenizer …")
            path = str(build_random_gpt2(Path(tmp) / f"gpt2-{cfg.shape}", cfg.shape))
            model_name = f"random GPT-2 {cfg.shape} shape"
        results = {"machine": machine(), "config": asdict(cfg), "model": model_name, "cases": []}
        inputs = prepare_inputs(cfg, path)
        for case in plan(cfg, path, inputs):
            label = case["kind"] + (f" {case['precision']}" if "precision" in case else "")
            progress(f"running {label} …")
            t = time.perf_counter()
            results["cases"].append(_run_isolated(case) if cfg.isolate else run_case(case))
            progress(f"  {label} took {time.perf_counter() - t:.0f} s (load average {os.getloadavg()[0]:.2f})")
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = time.perf_counter() - started
    return results


def _run_isolated(case: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.engine"], input=json.dumps(case), capture_output=True,
                          text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise RuntimeError(f"bench case {case['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report

def summarize(results: dict) -> dict:
    """Rows of the decode table, ratios and target checks from run_all's results."""
    cases = results["cases"]
    bandwidth = next(c for c in cases if c["kind"] == "bandwidth")
    baselines = next(c for c in cases if c["kind"] == "baselines")
    engines = [c for c in cases if c["kind"] == "engine"]
    quality = next((c for c in cases if c["kind"] == "quality"), None)
    bw = bandwidth["read_gb_s"] * 1e9
    base = baselines["runs"]
    chitchat, hf1, hfb = base["chitchat"], base["hf1"], base.get("hf_batch")
    rows = []

    def add(name, precision, run, case):
        rows.append({"path": name, "precision": precision, "tok_s": run["tok_s"], "decode_tok_s": run["decode_tok_s"],
                     "p50_s": run["p50_s"], "p95_s": run["p95_s"], "rss_mb": run.get("rss_mb", case.get("rss_serving_max_mb")),
                     "step_ms": run.get("step_ms"), "vs_chitchat": run["tok_s"] / chitchat["tok_s"],
                     "decode_vs_chitchat": run["decode_tok_s"] / chitchat["decode_tok_s"],
                     "vs_hf1": run["tok_s"] / hf1["tok_s"],
                     "vs_hf_batch": run["tok_s"] / hfb["tok_s"] if hfb else None,
                     "decode_vs_hf_batch": run["decode_tok_s"] / hfb["decode_tok_s"] if hfb else None})

    add("GPT2-chitchat loop (no KV cache), 1 chat", "fp32", chitchat, baselines)
    add("HF generate, 1 request at a time", "fp32", hf1, baselines)
    if hfb:
        add(f"HF generate, batch of {hfb['batch']}", "fp32", hfb, baselines)
    for case in engines:
        for key, run in case["runs"].items():
            if key.startswith("engine"):
                add(f"Mynah engine, {run['concurrency']} chat{'s' if run['concurrency'] > 1 else ''} at once",
                    case["precision"], run, case)
    floors = {}
    for case in engines:
        floor_ms = 1000 * case["weight_bytes"] / bw
        lone = case["runs"].get("engine1")
        floors[case["precision"]] = {"weight_mb": case["weight_bytes"] / 1e6, "floor_ms": floor_ms,
                                     "floor_tok_s": 1000 / floor_ms,
                                     "measured_ms": lone["step_ms"] if lone else None,
                                     "ratio": lone["step_ms"] / floor_ms if lone else None}
    prefix = next((c["runs"]["prefix"] for c in engines if "prefix" in c["runs"]), None)
    return {"rows": rows, "floors": floors, "bandwidth": bandwidth, "quality": quality, "prefix": prefix,
            "engines": engines, "baselines": baselines, "targets": _targets(rows, engines, floors, chitchat, hfb)}


def _targets(rows, engines, floors, chitchat, hfb) -> list[dict]:
    """The issue's targets, each with the measured value and met/missed."""
    out = []
    by = {(c["precision"], k): r for c in engines for k, r in c["runs"].items() if k.startswith("engine")}
    for precision in [c["precision"] for c in engines]:
        b32 = by.get((precision, "engine32"))
        if b32:
            ratio = b32["decode_tok_s"] / chitchat["decode_tok_s"]
            out.append({"target": f"{precision}: 32 chats decode ≥ 100× GPT2-chitchat loop and ≥ 250 tok/s",
                        "value": f"{b32['decode_tok_s']:.0f} tok/s decode = {ratio:.0f}× "
                                 f"(end to end {b32['tok_s']:.0f} tok/s = {b32['tok_s'] / chitchat['tok_s']:.0f}×)",
                        "met": ratio >= 100 and b32["decode_tok_s"] >= 250})
            if hfb:
                r = b32["tok_s"] / hfb["tok_s"]
                out.append({"target": f"{precision}: 32 chats ≥ 3× HF generate at batch {hfb['batch']}",
                            "value": f"{r:.1f}× end to end, {b32['decode_tok_s'] / hfb['decode_tok_s']:.1f}× decode",
                            "met": r >= 3})
        floor = floors.get(precision)
        if floor and floor["ratio"] is not None:
            out.append({"target": f"{precision}: batch-1 decode within 1.5× of the bandwidth floor",
                        "value": f"{floor['measured_ms']:.1f} ms/token vs floor {floor['floor_ms']:.1f} ms = {floor['ratio']:.2f}×",
                        "met": floor["ratio"] <= 1.5})
        b16, b1 = by.get((precision, "engine16")), by.get((precision, "engine1"))
        if b16 and b1:
            r = b16["p95_s"] / b1["p50_s"]
            out.append({"target": f"{precision}: p95 latency with 16 chats ≤ 3× a lone chat's",
                        "value": f"{b16['p95_s']:.2f} s vs {b1['p50_s']:.2f} s = {r:.2f}×", "met": r <= 3})
    limits = {"fp32": 1000, "int8": 500}
    for case in engines:
        limit = limits.get(case["precision"])
        if limit:
            lone = case["runs"].get("engine1", {})
            out.append({"target": f"{case['precision']}: RSS ≤ {limit / 1000:.1f} GB",
                        "value": f"{case['rss_serving_max_mb']:.0f} MB at most (busiest run), "
                                 f"{_fmt(lone.get('rss_mb'), '.0f')} MB serving 1 chat, "
                                 f"{_fmt(case.get('rss_started_mb'), '.0f')} MB ready and idle; "
                                 f"{case['rss_process_start_mb']:.0f} MB before loading the model",
                        "met": case["rss_serving_max_mb"] <= limit})
    return out


def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_report(results: dict, markdown: bool = False) -> str:
    """The tables `mynah bench` prints (markdown for docs/BENCHMARKS.md)."""
    s = summarize(results)
    m = results["machine"]
    cfg = results["config"]
    lines = []
    context = s["baselines"].get("context_tokens_mean")
    head = (f"model: {results['model']} ({s['baselines']['parameters'] / 1e6:.0f}M parameters); "
            f"contexts of ≤{cfg['context_tokens']} tokens (mean {_fmt(context)}), {cfg['new_tokens']} new tokens per reply; "
            f"{m['cpu'] or 'cpu'}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
            f"load average {m['loadavg'][0]:.2f} at start, {m.get('loadavg_end', m['loadavg'])[0]:.2f} at end")
    lines.append(head)
    lines.append("")
    cols = ["decode path", "precision", "tok/s", "decode tok/s", "p50 reply s", "p95 reply s", "RSS MB",
            "× chitchat", "× HF b1", "× HF batch"]
    table = []
    for r in s["rows"]:
        table.append([r["path"], r["precision"], _fmt(r["tok_s"]), _fmt(r["decode_tok_s"]), _fmt(r["p50_s"], ".2f"),
                      _fmt(r["p95_s"], ".2f"), _fmt(r["rss_mb"], ".0f"), _fmt(r["vs_chitchat"], ".1f"),
                      _fmt(r["vs_hf1"], ".2f"), _fmt(r["vs_hf_batch"], ".2f")])
    lines += _table(cols, table, markdown)
    lines.append("")
    bw = s["bandwidth"]
    lines.append(f"memory bandwidth: {bw['read_gb_s']:.1f} GB/s read (sum of a {bw['tensor_mb']} MB tensor), "
                 f"{bw['copy_gb_s']:.1f} GB/s copy, {bw['threads']} threads")
    lines.append("")
    floor_rows = [[p, _fmt(f["weight_mb"], ".0f"), _fmt(f["floor_ms"], ".1f"), _fmt(f["floor_tok_s"], ".0f"),
                   _fmt(f["measured_ms"], ".1f"), _fmt(f["ratio"], ".2f")] for p, f in s["floors"].items()]
    lines += _table(["precision", "weights read per token MB", "floor ms/token", "floor tok/s",
                     "engine batch-1 ms/token", "× floor"], floor_rows, markdown)
    q = s["quality"]
    if q:
        lines.append("")
        lines.append(f"int8 vs fp32 on {q['windows']} held-out chitchat dialogues ({q['tokens']} tokens): "
                     f"next-token agreement {100 * q['agreement']:.1f}%, loss {q['loss_fp32']:.4f} → {q['loss_int8']:.4f} "
                     f"({q['loss_int8'] - q['loss_fp32']:+.4f})")
    p = s["prefix"]
    if p:
        lines.append("")
        text = (f"prefix reuse: {p['reusable_turns']} of {p['bot_turns']} bot turns ({100 * p['reusable_fraction']:.0f}%) "
                f"could reuse the previous turn's KV cache with max_history_turns={cfg['max_history_turns']}")
        if "prefill_full_ms" in p:
            text += (f"; where it applies, prefill {p['prefill_full_ms']:.0f} ms → {p['prefill_suffix_ms']:.0f} ms "
                     f"({p['example_prefix_tokens']} of {p['example_context_tokens']} tokens cached) = "
                     f"{100 * p['saving_per_reusable_reply']:.0f}% of a lone reply; expected saving "
                     f"{100 * p['expected_saving_per_reply']:.1f}% per reply; cache {p['kv_mb_per_chat']:.1f} MB per chat")
        lines.append(text)
    lines.append("")
    lines.append("targets (issue 6; defined for the 124M shape):")
    lines.append("")
    lines += _table(["target", "measured", "met"],
                    [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in s["targets"]], markdown)
    return "\n".join(lines)


def _table(cols: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


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
