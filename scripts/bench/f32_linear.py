"""Mynah's fp32 linear kernel against torch's MKL and oneDNN's packed layout, on one decode step's matrices.

    python -m scripts.bench.f32_linear [--model gpt2|smollm2] [--rows 1,16,64,320] [--threads 1] [--repeats 5]

The matrices of one decode step of the model's shape (scripts.bench.int8_linear.SHAPES), each its
own random weights, so a step reads them from memory as serving does. For each row count: the best
of `repeats` passes over every matrix (ms), the three alternating: MKL (`F.linear` on the weights as
loaded, what Intel CPUs serve), oneDNN's pre-packed weights (what the engine packed on other CPUs
before) and Mynah's kernel (engine.serving.f32_native, what it packs now). The head is left out
above 64 rows (a prefill multiplies only its last tokens by it). A one-row pass is also given in
GB/s: the bytes of weights read over the time.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from scripts.bench.int8_linear import SHAPES, best_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="gpt2")
    parser.add_argument("--rows", default="1,16,64,320")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from engine.serving.f32_native import NativeF32Linear
    from engine.serving.fastpath.kernels import f32_why_not

    why = f32_why_not()
    if why:
        raise SystemExit(f"the fp32 kernel does not run here: {why}")
    torch.set_num_threads(args.threads)
    body, head = SHAPES[args.model]
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for n, k in body + [head]]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    native = [NativeF32Linear(w, None) for w in weights]
    print(f"{args.model}: {len(weights)} matrices; {args.threads} thread(s); ms per pass, best of {args.repeats}")
    print("| rows | MKL ms | oneDNN ms | Mynah ms | oneDNN / Mynah | MKL / Mynah |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            used = len(weights) if rows <= 64 else len(weights) - 1
            inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights[:used]}}
            runs = {
                "mkl": [lambda w=w: F.linear(inputs[w.shape[1]], w) for w in weights[:used]],
                "onednn": [lambda w=w, p=p: torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
                           for w, p in zip(weights[:used], onednn[:used])],
                "mynah": [lambda n=n: n(inputs[n.in_features]) for n in native[:used]],
            }
            best_ms([c for calls in runs.values() for c in calls], 1)  # warm up all three
            ms = {name: best_ms(calls, args.repeats) for name, calls in runs.items()}
            ms = {name: min(ms[name], best_ms(calls, args.repeats)) for name, calls in runs.items()}
            line = f"| {rows} | {ms['mkl']:.2f} | {ms['onednn']:.2f} | {ms['mynah']:.2f} | " \
                   f"{ms['onednn'] / ms['mynah']:.2f}× | {ms['mkl'] / ms['mynah']:.2f}× |"
            if rows == 1:
                gigabytes = sum(w.numel() * 4 for w in weights[:used]) / 1e9
                line += "  one row, GB/s: " + ", ".join(f"{name} {gigabytes / (t / 1e3):.1f}" for name, t in ms.items())
            print(line)


if __name__ == "__main__":
    main()
