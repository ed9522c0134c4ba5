"""One decode step of the Llama fast path on SmolLM2-135M's shape, as the engine serves it, and where it goes.

    PYTHONPATH=. python -m scripts.bench.step [--precision fp32|int8] [--rows 16] [--steps 20] [--profile]

A random Llama of SmolLM2-135M's shape (scripts/bench/llama.py), loaded lean and packed as the
batcher packs it (fastpath.onednn.pack_if_faster for fp32; int8 quantized at load), `rows` contexts
of 60-75 random tokens prefilled, then `steps` decode steps timed one by one on one thread: the
best and the median in ms. --profile adds torch's profiler table of five more steps (the products,
attention and the small ops between them). Why it exists: a busy bot's step time is what 16 chats
wait on every token, and the parts say what to work on (docs/BENCHMARKS.md, thirteenth pass).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    from engine.model import load_model
    from engine.serving.fastpath import pick_decoder
    from engine.serving.fastpath.onednn import fp32_packing, pack_if_faster
    from scripts.bench.llama import build_random_llama

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        build_random_llama(Path(folder))
        loaded = load_model(folder, quantize="int8" if args.precision == "int8" else "none", lean=True)
        packing = (fp32_packing() or "as loaded (MKL)") if args.precision == "fp32" else "int8"
        if args.precision == "fp32":
            pack_if_faster(loaded.model)
        decoder = pick_decoder(loaded.model)
        torch.manual_seed(0)
        contexts = [torch.randint(0, 49000, (60 + i % 16,)).tolist() for i in range(args.rows)]
        with torch.inference_mode():
            state, logits = decoder.prefill(contexts, list(range(args.rows)), room=args.steps + 16)
            tokens = logits.argmax(-1)
            for _ in range(3):
                tokens = decoder.decode(state, tokens).argmax(-1)
            times = []
            for _ in range(args.steps):
                started = time.perf_counter()
                logits = decoder.decode(state, tokens)
                times.append((time.perf_counter() - started) * 1e3)
                tokens = logits.argmax(-1)
            print(f"SmolLM2-135M shape, {args.precision} ({packing}), {args.rows} rows, one thread: decode step "
                  f"best {min(times):.1f} ms, median {statistics.median(times):.1f} ms")
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(5):
                        tokens = decoder.decode(state, tokens).argmax(-1)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
