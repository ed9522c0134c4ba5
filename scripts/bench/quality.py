"""int8 against fp32 for `mynah bench`: next-token agreement and held-out loss per token."""
from __future__ import annotations

import statistics

import torch

from engine.types import max_positions


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
    limit = min(max_len, max_positions(fp32.model))
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
