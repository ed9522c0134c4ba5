"""Sampled replies to fixed probe prompts, for the learning loop's parrot check.

The trainer child samples the active model and the candidate on the same prompts with the
same seeds, so the only difference between the two lists is what the candidate learned. A
plain loop (no KV cache): a handful of short replies, run once per training run.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def sample_replies(loaded, prompts: list[str], *, samples: int = 3, seed: int = 0, max_new_tokens: int = 24,
                   temperature: float = 0.9, top_k: int = 40) -> list[dict]:
    """[{"prompt", "replies": [...]}] — `samples` replies per prompt, seeded per (prompt, sample)."""
    model, fmt = loaded.model, loaded.fmt
    model.eval()
    device = next(model.parameters()).device
    limit = int(getattr(model.config, "n_positions", 1024) or 1024)
    out = []
    for p_index, prompt in enumerate(prompts):
        context = fmt.context_ids([("user", prompt)], max(8, limit - max_new_tokens - 1))
        replies = []
        for s in range(samples):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1000003 + p_index * 101 + s)
            ids = list(context)
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
                for banned in fmt.banned_ids:
                    if 0 <= banned < logits.numel():
                        logits[banned] = float("-inf")
                values, index = torch.topk(logits / max(temperature, 1e-5), min(top_k, logits.numel()))
                choice = int(index[torch.multinomial(torch.softmax(values, -1), 1, generator=gen)])
                if choice in fmt.stop_ids:
                    break
                new.append(choice)
                ids.append(choice)
            replies.append(fmt.decode(new))
        out.append({"prompt": prompt, "replies": replies})
    return out
