"""Mynah's int8 linear kernel against fbgemm's dynamic-int8 call, on one decode step's matrices.

    python -m scripts.bench.int8_linear [--model smollm2|gpt2] [--rows 1,16,64,320] [--repeats 5]
    MYNAH_AMX=off python -m scripts.bench.int8_linear      # the VNNI path only

The matrices of one decode step of the model's shape, each its own random weights (so a step reads
them from memory as serving does, not from cache): SmolLM2-135M, 30 layers of q/k/v fused
(960 x 576), o (576 x 576), gate/up fused (3,072 x 576), down (576 x 1,536), and the 49,152-id output
head; GPT-2 124M, 12 layers of 2,304 x 768, 768 x 768, 3,072 x 768, 768 x 3,072 and the head.
For each row count: the best of `repeats` passes over every matrix (ms), one thread, fbgemm and
the kernel alternating. The head is left out above 64 rows (a prefill multiplies only its last
tokens by it).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

SHAPES = {"smollm2": ([(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30, (49152, 576)),
          "gpt2": ([(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12, (49152, 768))}


def layers(model: str):
    """(fbgemm layer, native layer) pairs holding the same int8 weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from engine.serving.int8_native import from_dynamic

    body, head = SHAPES[model]
    pairs = []
    torch.manual_seed(0)
    for out_features, in_features in body + [head]:
        linear = nn.Linear(in_features, out_features)
        linear.qconfig = per_channel_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dynamic = DynamicInt8Linear.from_float(linear)
        pairs.append((dynamic, from_dynamic(dynamic)))
    return pairs


def best_ms(calls, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--rows", default="1,16,64,320")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from engine.serving.fastpath.kernels import int8_why_not

    why = int8_why_not()
    if why:
        raise SystemExit(f"the int8 kernel does not run here: {why}")
    torch.set_num_threads(1)
    pairs = layers(args.model)
    print(f"{args.model}: {len(pairs)} matrices; one thread; ms per pass, best of {args.repeats}")
    print("| rows | fbgemm ms | Mynah ms | fbgemm / Mynah |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            used = pairs if rows <= 64 else pairs[:-1]
            inputs = {k: torch.randn(rows, k) for k in {p[0].in_features for p in used}}
            fbgemm = [lambda d=d: d(inputs[d.in_features]) for d, _ in used]
            native = [lambda n=n: n(inputs[n.in_features]) for _, n in used]
            best_ms(fbgemm + native, 1)  # warm up both
            a, b = best_ms(fbgemm, args.repeats), best_ms(native, args.repeats)
            a, b = min(a, best_ms(fbgemm, args.repeats)), min(b, best_ms(native, args.repeats))
            print(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
