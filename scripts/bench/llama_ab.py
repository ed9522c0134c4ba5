"""The Llama rows of `mynah bench` alone, engine level, for one or more source trees back to back.

    python -m scripts.bench.llama_ab [--threads 1] [--skip-hf] [LABEL=TREE ...]

Builds the random Llama of SmolLM2-135M's shape once, then per precision runs CTranslate2,
Mynah's engine from each TREE (a checkout of this project, e.g. `git archive` of an older
commit; default: this one) and transformers' `generate`, each in its own process, one right
after the other, so a change is measured against what it replaces on the same machine load.
Engine: lone replies, 16 chats each sending one message at once (per-reply latency), and a
burst of 16 (until all answered, the number compared with a CTranslate2 batch of 16).
Prints one JSON line per case and a summary table. Nothing here is used by `mynah bench`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(case: dict, tree: Path) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", PYTHONPATH=str(tree))
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.engine"], input=json.dumps(case), capture_output=True,
                          text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['kind']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from scripts.bench.config import BenchConfig
    from scripts.bench.engine import prepare_inputs
    from scripts.bench.llama import build_random_llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="LABEL=PATH source trees to measure (default: this one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-hf", action="store_true", help="no transformers generate rows")
    parser.add_argument("--precisions", default="fp32,int8")
    args = parser.parse_args(argv)
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.trees] or [("this", ROOT)]
    cfg = BenchConfig(threads=args.threads, concurrency=[1, 16], rounds=1, lone_rounds=4, burst=16, burst_reps=2,
                      hf_prompts=4, hf_batch=16, chitchat_prompts=0, stagger_requests=0, training_replies=0, bot=False)
    table = []
    with tempfile.TemporaryDirectory(prefix="mynah-llama-ab-") as tmp:
        path, _ = build_random_llama(Path(tmp) / "llama")
        prompts = prepare_inputs(cfg, str(path))["prompts"]
        base = {"config": dataclasses.asdict(cfg), "path": str(path), "prompts": prompts, "family": "llama"}
        for precision in args.precisions.split(","):
            out = {"ct2": _run({**base, "kind": "ct2", "precision": precision}, ROOT)}
            for label, tree in trees:
                out[label] = _run({**base, "kind": "engine", "precision": precision, "conversations": [],
                                   "training": False}, tree)
            if not args.skip_hf:
                out["hf"] = _run({**base, "kind": "baselines", "precision": precision}, ROOT)
            for name, result in out.items():
                print(json.dumps({"precision": precision, "case": name, **result}), flush=True)
            table += _summary(precision, out, [label for label, _ in trees])
    print("\n".join(table))
    return 0


def _summary(precision: str, out: dict, labels: list[str]) -> list[str]:
    ct, hf = out["ct2"], out.get("hf")
    lines = [f"\n{precision}: lone p50 s | 16 chats tok/s, p50/p95 reply s | burst of 16 s | x CT2 lone, burst | "
             f"HF batch16 / burst (load average)",
             f"  ct2: lone {ct['lone']['p50_s']:.2f} | burst {ct['burst']['seconds']:.2f}"]
    if hf:
        lines.append(f"  hf: lone {hf['runs']['hf1']['p50_s']:.2f} | batch of 16 {hf['runs']['hf_batch']['seconds']:.2f}")
    for label in labels:
        runs = out[label]["runs"]
        lone, many, burst = runs["engine1"], runs["engine16"], runs["burst16"]
        versus_hf = f"{hf['runs']['hf_batch']['seconds'] / burst['seconds']:.2f}x" if hf else "-"
        lines.append(f"  {label}: lone {lone['p50_s']:.2f} ({lone['tok_s']:.1f} tok/s) | {many['tok_s']:.1f} tok/s, "
                     f"{many['p50_s']:.2f}/{many['p95_s']:.2f} | {burst['seconds']:.2f} | "
                     f"{lone['p50_s'] / ct['lone']['p50_s']:.2f}x, {burst['seconds'] / ct['burst']['seconds']:.2f}x | "
                     f"{versus_hf} (load {out[label]['loadavg_before'][0]:.1f})")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
