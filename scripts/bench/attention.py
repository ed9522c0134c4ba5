"""One decode step's attention, per layer: the float16 kernel against torch's SDPA on float32 and float16.

    python -m scripts.bench.attention            # one thread, as the bot on a 2-core machine

Shapes are the bench's: GPT-2 124M (12 heads of 64) and SmolLM2-135M (9 query heads over 3
key/value heads of 64), 16 rows of mixed lengths (the bench's 16-chat burst through the bot)
and a lone row (SmolLM2's chat template: a ~300-token context). Best of 5 runs of 300 calls, µs.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from engine.serving.fastpath import kernels

SHAPES = [  # name, rows, query heads, key/value heads, columns (the longest row), head width
    ("GPT-2 124M, 16 rows", 16, 12, 12, 75, 64),
    ("GPT-2 124M, 1 row", 1, 12, 12, 60, 64),
    ("SmolLM2-135M, 16 rows", 16, 9, 3, 95, 64),
    ("SmolLM2-135M, 1 row", 1, 9, 3, 300, 64),
]


def _time(fn, calls: int = 300, runs: int = 5) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def main() -> None:
    torch.set_num_threads(1)
    why = kernels.why_not()
    print(f"kernel: {why or 'ready'}; torch {torch.__version__}, 1 thread")
    print(f"{'shape':24} {'SDPA fp32':>10} {'SDPA fp16':>10} {'kernel':>10}   (µs a layer)")
    g = torch.Generator().manual_seed(0)
    for name, rows, heads, kv_heads, columns, width in SHAPES:
        k32, v32 = (torch.randn(rows, kv_heads, columns, width, generator=g) for _ in range(2))
        k16, v16 = k32.half(), v32.half()
        q = torch.randn(rows, heads, width, generator=g)
        lengths = torch.randint(columns // 3, columns + 1, (rows,), generator=g)
        lengths[0] = columns
        see = (torch.arange(columns)[None, :] < lengths[:, None])[:, None, None, :]
        grouped = q.view(rows, kv_heads, heads // kv_heads, width)
        with torch.inference_mode():
            fp32 = _time(lambda: F.scaled_dot_product_attention(grouped, k32, v32, attn_mask=see))
            fp16 = _time(lambda: F.scaled_dot_product_attention(grouped.half(), k16, v16, attn_mask=see))
            mine = _time(lambda: torch.ops.mynah.decode_attention(q, k16, v16, lengths, width ** -0.5)) if not why else float("nan")
        print(f"{name:24} {fp32:10.0f} {fp16:10.0f} {mine:10.0f}")


if __name__ == "__main__":
    main()
