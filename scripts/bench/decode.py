"""The decode paths `mynah bench` compares, each timed on the same prompts.

- GPT2-chitchat's loop: the whole sequence through the model at every step, batch 1;
- Hugging Face `generate`, one request per call or a left-padded batch per call;
- Mynah's engine with N chats talking at once (`run_engine`).

Each returns tokens, seconds, tok/s, decode tok/s and p50/p95 reply latency.
"""
from __future__ import annotations

import asyncio
import time

import torch

from engine.types import percentile
from scripts.bench.config import BenchConfig


def _latency_stats(latencies: list[float]) -> dict:
    return {"p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95), "replies": len(latencies)}


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


def make_engine(loaded, cfg: BenchConfig):
    """One engine for every concurrency level of a run (one worker thread, as in the bot)."""
    from engine.serving.batcher import Engine
    from engine.serving.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens)
    top = max(cfg.concurrency + [cfg.burst])
    return Engine(loaded, params, max_batch_size=top, max_queue=4 * top + 8, max_context_tokens=cfg.context_tokens,
                  threads=cfg.threads, prefill_threads=cfg.prefill_threads, pack_weights=cfg.pack_weights, fast_path=cfg.fast_path)


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
