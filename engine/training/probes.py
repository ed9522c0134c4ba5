"""Sampled replies to fixed probe prompts, for the learning loop's parrot check.

The trainer child samples the active model and the candidate on the same prompts with the
same seeds, so the only difference between the two lists is what the candidate learned.
Tokens are drawn by the serving sampler (engine/serving/sampling.py) with the bot's own
[generation] settings, so the check sees replies drawn the way users see them. A plain
loop (no KV cache): a handful of short replies, run once per training run.
"""
from __future__ import annotations

import dataclasses

import torch

from engine.serving.protocol import SamplingParams
from engine.serving.sampling import BatchSampler, RowSampler, banned_ids


@torch.no_grad()
def sample_replies(loaded, prompts: list[str], params: SamplingParams | None = None, *, samples: int = 3,
                   seed: int = 0) -> list[dict]:
    """[{"prompt", "replies": [...]}] — `samples` replies per prompt, seeded per (prompt, sample)."""
    params = params or SamplingParams()
    model, fmt = loaded.model, loaded.fmt
    model.eval()
    device = next(model.parameters()).device
    limit = int(getattr(model.config, "n_positions", 1024) or 1024)
    banned = banned_ids(loaded, params)
    out = []
    for p_index, prompt in enumerate(prompts):
        context = fmt.context_ids([("user", prompt)], max(8, limit - params.max_new_tokens - 1))
        replies = []
        for s in range(samples):
            row = dataclasses.replace(params, seed=seed * 1000003 + p_index * 101 + s)
            sampler = BatchSampler([RowSampler(row, list(context), banned)], fmt.stop_ids)
            ids, new = list(context), []
            for step in range(params.max_new_tokens):
                logits = model(torch.tensor([ids], device=device)).logits[:, -1]
                choice = sampler.sample(logits, [step])[0]
                if choice in fmt.stop_ids:
                    break
                new.append(choice)
                ids.append(choice)
            replies.append(fmt.decode(new))
        out.append({"prompt": prompt, "replies": replies})
    return out
