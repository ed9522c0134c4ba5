"""`mynah eval`: how well a model chats (scripts/quality.py: memory-probe recall with and without
the per-user memory, replies ending at a sentence end, distinct-2, reply length, held-out loss
per character), or, given a backward model, whether MMI reranking makes replies less generic.

    mynah eval --model smollm2 --memory-chats 20 --prompts 40 --loss-dialogues 60
    mynah eval --model models/fwd --mmi-model models/mmi --prompts 200 --candidates 8

The rest of this docstring is about the MMI comparison.

Prompts come from the held-out conversations of the corpus (split by conversation with
the same fraction and seed as `mynah train`, so neither model trained on them; pass the
--valid-fraction the models were trained with): --cuts random cuts per dialogue, the
turns before a cut as the context. For each prompt the engine samples N
candidates in one batch (seeds SEED + i*N …) and the MMI engine scores them once. Every
row below answers the same prompts from the same candidates:

- no MMI: candidate 0, i.e. exactly what the engine answers without MMI with that seed;
- forward rerank (w=0): the candidate the forward model likes best;
- MMI w=…: the candidates the serving path picks with each weight (the configured one
  is what the bot answers);
- human: the corpus's own next turn, for scale.

Reported: generic-reply rate (stock phrases, fillers, echoes of the context, replies
repeated for 3+ prompts, empty), distinct-1/2 over all replies, mean words per reply, and
the mean forward log-prob per token of the chosen replies (what MMI pays in fluency).
"""
from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from scripts.heldout import held_out_prompts

NAME = "eval"
HELP = ("measure a model's chat quality (memory recall, sentence ends, distinct-2, loss per character); with "
        "--mmi-model, generic-reply rate and distinct-1/2 with and without MMI reranking")


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="forward model (default: [model] path in config)")
    parser.add_argument("--mmi-model", help="backward model (default: [generation] mmi_model in config)")
    parser.add_argument("--corpus", action="append", default=[], metavar="SPEC",
                        help="held-out dialogues come from this corpus (default: chitchat); repeatable")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="as in `mynah train` (default 0.05)")
    parser.add_argument("--split-seed", type=int, default=0, help="the --seed `mynah train` split with (default 0)")
    parser.add_argument("--prompts", type=int, default=200, help="at most this many held-out prompts (default 200)")
    parser.add_argument("--cuts", type=int, default=1, help="prompts per held-out dialogue, at random turns (default 1)")
    parser.add_argument("--candidates", type=int, default=0, help="N (default: [generation] mmi_candidates, at least 2)")
    parser.add_argument("--weights", default="", help="comma-separated MMI weights to report (default: 0.25,0.5,0.75,1 and the configured one)")
    parser.add_argument("--max-history-turns", type=int, default=0, help="context turns (default: config's)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="default: config's")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed base (default 1234)")
    parser.add_argument("--concurrency", type=int, default=8, help="prompts in flight at once (default 8)")
    parser.add_argument("--examples", type=int, default=5, help="print this many prompts with their replies")
    parser.add_argument("--distractors", type=int, default=9,
                        help="rank the human's next turn among this many from other dialogues (0: skip; default 9)")
    parser.add_argument("--no-direction-check", action="store_true",
                        help="skip the backward model's held-out loss on reversed vs forward turn order")
    parser.add_argument("--output", default="", metavar="FILE", help="write every prompt, candidate and score as JSON")
    parser.add_argument("--quality", action="store_true",
                        help="the chat-quality report even when an MMI model is configured (the default without one)")
    parser.add_argument("--memory-chats", type=int, default=20, help="quality: scripted memory-probe chats (default 20)")
    parser.add_argument("--loss-dialogues", type=int, default=100,
                        help="quality: held-out dialogues for the loss per character (default 100)")


def row_weights(text: str, configured: float) -> list[float]:
    weights = [float(w) for w in text.split(",") if w.strip()] if text else [0.25, 0.5, 0.75, 1.0]
    if configured not in weights:
        weights.append(configured)
    return sorted(set(weights))


async def run_eval(args, config) -> dict:
    from bots.app import build_engine
    from engine.model import load_model
    from engine.serving.mmi import MMIEngine
    from engine.training.data import read_corpora

    g, m = config.generation, config.model
    mmi_path = args.mmi_model or g.mmi_model
    if not mmi_path:
        raise ValueError("no backward model: give --mmi-model PATH or set [generation] mmi_model")
    n = args.candidates or max(2, g.mmi_candidates)
    max_turns = args.max_history_turns or g.max_history_turns
    dialogues = read_corpora(args.corpus or ["chitchat"])
    prompts = held_out_prompts(dialogues, args.prompts, args.valid_fraction, args.split_seed, max_turns, args.seed,
                               args.cuts)
    if not prompts:
        raise ValueError("no held-out dialogues to evaluate on")

    forward = await asyncio.to_thread(load_model, args.model or m.path, fmt=m.format, device=m.device,
                                      quantize=config.engine.quantize)
    backward = await asyncio.to_thread(load_model, mmi_path, device=m.device, quantize=config.engine.quantize)
    engine = build_engine(config, forward)
    engine.max_batch_size = max(engine.max_batch_size, min(64, n * args.concurrency))
    mmi = MMIEngine(engine, backward, candidates=n, weight=g.mmi_weight)
    overrides = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    started = time.monotonic()
    results = await _rerank_all(mmi, prompts, overrides, args.concurrency, args.seed, n)
    elapsed = time.monotonic() - started

    rows, table = _choice_table(results, prompts, row_weights(args.weights, g.mmi_weight), g.mmi_weight,
                                g.fallback_reply)
    direction = None
    if not args.no_direction_check:  # a real backward model predicts reversed dialogues far better
        direction = await asyncio.to_thread(_direction_check, backward, prompts)
    retrieval = None
    if args.distractors > 0 and len({id(p["dialogue"]) for p in prompts}) > args.distractors:
        retrieval = await asyncio.to_thread(_retrieval, mmi, prompts, args.distractors, args.seed, g.mmi_weight)
    return {
        "model": forward.path, "mmi_model": backward.path, "prompts": len(prompts), "candidates": n,
        "configured_weight": g.mmi_weight, "seed": args.seed, "elapsed_s": elapsed,
        "sampling": {k: getattr(mmi.defaults.merged(overrides), k) for k in
                     ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")},
        "table": table, "rows": rows, "backward_loss": direction, "retrieval": retrieval,
        "details": [{"turns": p["turns"], "reference": p["reference"], "chosen": r.chosen,
                     "candidates": [{"text": c.text, "forward": c.forward, "backward": c.backward} for c in r.candidates]}
                    for p, r in zip(prompts, results)],
    }


async def _rerank_all(mmi, prompts: list[dict], overrides: dict, concurrency: int, seed: int, n: int) -> list:
    """Every prompt through the MMI engine, `concurrency` at a time (prompt i samples seeds SEED + i*N …)."""
    gate = asyncio.Semaphore(max(1, concurrency))
    done = 0
    started = time.monotonic()

    async def one(i: int, prompt: dict):
        nonlocal done
        async with gate:
            result = await mmi.rerank(prompt["turns"], {**overrides, "seed": seed + i * n})
        done += 1
        if done % 20 == 0 or done == len(prompts):
            print(f"  {done}/{len(prompts)} prompts, {time.monotonic() - started:.0f}s", file=sys.stderr)
        return result

    async with mmi:
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])


def _choice_table(results: list, prompts: list[dict], weights: list[float], configured: float,
                  fallback: str) -> tuple[dict[str, list[int]], dict[str, dict]]:
    """(which candidate each row picks per prompt, the metrics of each row's replies)."""
    from engine.serving.mmi import pick_best
    from engine.training.evaluation import reply_metrics

    contexts = [[t for _, t in p["turns"]] for p in prompts]
    rows: dict[str, list[int]] = {"no MMI (1 sample)": [0] * len(results)}
    choose = lambda r, w: pick_best([c.text for c in r.candidates], [c.forward for c in r.candidates],  # noqa: E731
                                    [c.backward for c in r.candidates], w)
    rows["forward rerank (w=0)"] = [choose(r, 0.0) for r in results]
    for w in weights:
        if w > 0:
            rows[f"MMI w={w:g}" + (" (configured)" if w == configured else "")] = [choose(r, w) for r in results]
    # the serving path's own choice must be the configured row
    assert [r.chosen for r in results] == [choose(r, configured) for r in results]

    table = {}
    for name, picks in rows.items():
        replies = [r.candidates[k].reply.text for r, k in zip(results, picks)]
        metrics = reply_metrics(replies, contexts, fallback=fallback).as_dict()
        metrics["forward_logprob"] = sum(r.candidates[k].forward for r, k in zip(results, picks)) / len(results)
        table[name] = metrics
    human = reply_metrics([p["reference"] for p in prompts], contexts).as_dict()
    human["forward_logprob"] = None
    table["human reference"] = human
    return rows, table


def _direction_check(backward, prompts: list[dict]) -> dict:
    """The backward model's held-out loss on the prompts' dialogues reversed and in forward order."""
    from engine.training.data import reverse_turns
    from engine.training.train import evaluate_loss

    held = list({id(p["dialogue"]): p["dialogue"] for p in prompts}.values())
    return {"reversed": evaluate_loss(backward.model, backward.fmt, reverse_turns(held)),
            "forward_order": evaluate_loss(backward.model, backward.fmt, held)}


def _retrieval(mmi, prompts: list[dict], distractors: int, seed: int, weight: float) -> dict:
    """How often each scorer ranks the human's real next turn first among it and `distractors`
    next turns of other held-out dialogues (chance: 1 / (distractors + 1)). The backward model
    can only beat chance by knowing what the context says."""
    from engine.serving.mmi import combined_scores

    rng = random.Random(seed)
    hits = {"forward": 0, "backward": 0, "combined": 0}
    for i, p in enumerate(prompts):
        others = rng.sample([j for j in range(len(prompts)) if prompts[j]["dialogue"] is not p["dialogue"]], distractors)
        texts = [p["reference"]] + [prompts[j]["reference"] for j in others]
        fwd, bwd = mmi.score(p["turns"], texts)
        for name, scores in (("forward", fwd), ("backward", bwd), ("combined", combined_scores(fwd, bwd, weight))):
            hits[name] += int(max(range(len(texts)), key=scores.__getitem__) == 0)
    return {"distractors": distractors, "chance": 1 / (distractors + 1),
            **{f"recall_at_1_{k}": v / len(prompts) for k, v in hits.items()}}


def format_table(report: dict) -> str:
    head = f"{'':26} {'generic':>8} {'stock':>6} {'echo':>6} {'repeat':>6} {'dist-1':>7} {'dist-2':>7} {'words':>6} {'fwd lp':>7}"
    lines = [head]
    for name, t in report["table"].items():
        lp = "" if t["forward_logprob"] is None else f"{t['forward_logprob']:.2f}"
        lines.append(f"{name:26} {t['generic_rate']:8.1%} {t['stock_rate']:6.1%} {t['echo_rate']:6.1%} "
                     f"{t['repeated_rate']:6.1%} {t['distinct_1']:7.3f} {t['distinct_2']:7.3f} {t['mean_words']:6.1f} {lp:>7}")
    return "\n".join(lines)


def run(args) -> int:
    from bots.config import load_config
    from engine.model import ModelLoadError

    config = load_config(args.config)
    if args.quality or not (args.mmi_model or config.generation.mmi_model):
        return _run_quality(args, config)
    try:
        report = asyncio.run(run_eval(args, config))
    except (ModelLoadError, ValueError, RuntimeError, OSError) as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    s = report["sampling"]
    print(f"{report['prompts']} held-out prompts, {report['candidates']} candidates each, "
          f"temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}, "
          f"repetition penalty {s['repetition_penalty']}, max {s['max_new_tokens']} new tokens; "
          f"{report['elapsed_s']:.0f}s")
    print(f"forward: {report['model']}\nbackward: {report['mmi_model']}\n")
    print(format_table(report))
    if report["backward_loss"]:
        b = report["backward_loss"]
        print(f"\nbackward model, held-out loss per token: {b['reversed']:.3f} on these dialogues reversed, "
              f"{b['forward_order']:.3f} in forward order")
    if report["retrieval"]:
        r = report["retrieval"]
        print(f"the human's next turn ranked first among {r['distractors'] + 1} (chance {r['chance']:.0%}): "
              f"forward {r['recall_at_1_forward']:.1%}, backward {r['recall_at_1_backward']:.1%}, "
              f"combined (w={report['configured_weight']:g}) {r['recall_at_1_combined']:.1%}")
    names = [k for k in report["rows"] if "configured" in k] or list(report["rows"])[-1:]
    for d in report["details"][:args.examples]:
        print()
        for role, text in d["turns"]:
            print(f"  {role:>4}: {text}")
        print(f"  human: {d['reference']}")
        print(f"  no MMI: {d['candidates'][0]['text']}")
        print(f"  {names[0]}: {d['candidates'][d['chosen']]['text']}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        print(f"\nwrote {args.output}")
    return 0


def _run_quality(args, config) -> int:
    from engine.model import ModelLoadError
    from scripts.quality import format_quality, run_quality

    try:
        report = asyncio.run(run_quality(args, config))
    except (ModelLoadError, ValueError, RuntimeError, OSError) as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(format_quality(report))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        print(f"\nwrote {args.output}")
    return 0
