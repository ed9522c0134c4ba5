"""The tables `mynah bench` prints, from run_all's results: decode paths, the bandwidth floor,
int8 quality, prefix reuse, and the performance issue's targets checked one by one."""
from __future__ import annotations

import math


def summarize(results: dict) -> dict:
    """Rows of the decode table, ratios and target checks from run_all's results."""
    cases = results["cases"]
    bandwidth = next(c for c in cases if c["kind"] == "bandwidth")
    baselines = next(c for c in cases if c["kind"] == "baselines")
    engines = [c for c in cases if c["kind"] == "engine"]
    quality = next((c for c in cases if c["kind"] == "quality"), None)
    bw = bandwidth["read_gb_s"] * 1e9
    base = baselines["runs"]
    chitchat, hf1, hfb = base["chitchat"], base["hf1"], base.get("hf_batch")
    rows = []

    def add(name, precision, run, case):
        rows.append({"path": name, "precision": precision, "tok_s": run["tok_s"], "decode_tok_s": run["decode_tok_s"],
                     "p50_s": run["p50_s"], "p95_s": run["p95_s"], "rss_mb": run.get("rss_mb", case.get("rss_serving_max_mb")),
                     "step_ms": run.get("step_ms"), "vs_chitchat": run["tok_s"] / chitchat["tok_s"],
                     "decode_vs_chitchat": run["decode_tok_s"] / chitchat["decode_tok_s"],
                     "vs_hf1": run["tok_s"] / hf1["tok_s"],
                     "vs_hf_batch": run["tok_s"] / hfb["tok_s"] if hfb else None,
                     "decode_vs_hf_batch": run["decode_tok_s"] / hfb["decode_tok_s"] if hfb else None})

    add("GPT2-chitchat loop (no KV cache), 1 chat", "fp32", chitchat, baselines)
    add("HF generate, 1 request at a time", "fp32", hf1, baselines)
    if hfb:
        add(f"HF generate, batch of {hfb['batch']}", "fp32", hfb, baselines)
    for case in engines:
        for key, run in case["runs"].items():
            if key.startswith("engine"):
                add(f"Mynah engine, {run['concurrency']} chat{'s' if run['concurrency'] > 1 else ''} at once",
                    case["precision"], run, case)
    floors = {}
    for case in engines:
        floor_ms = 1000 * case["weight_bytes"] / bw
        lone = case["runs"].get("engine1")
        floors[case["precision"]] = {"weight_mb": case["weight_bytes"] / 1e6, "floor_ms": floor_ms,
                                     "floor_tok_s": 1000 / floor_ms,
                                     "measured_ms": lone["step_ms"] if lone else None,
                                     "ratio": lone["step_ms"] / floor_ms if lone else None}
    prefix = next((c["runs"]["prefix"] for c in engines if "prefix" in c["runs"]), None)
    return {"rows": rows, "floors": floors, "bandwidth": bandwidth, "quality": quality, "prefix": prefix,
            "engines": engines, "baselines": baselines, "targets": _targets(rows, engines, floors, chitchat, hfb)}


def _targets(rows, engines, floors, chitchat, hfb) -> list[dict]:
    """The issue's targets, each with the measured value and met/missed."""
    out = []
    by = {(c["precision"], k): r for c in engines for k, r in c["runs"].items() if k.startswith("engine")}
    for precision in [c["precision"] for c in engines]:
        b32 = by.get((precision, "engine32"))
        if b32:
            ratio = b32["decode_tok_s"] / chitchat["decode_tok_s"]
            out.append({"target": f"{precision}: 32 chats decode ≥ 100× GPT2-chitchat loop and ≥ 250 tok/s",
                        "value": f"{b32['decode_tok_s']:.0f} tok/s decode = {ratio:.0f}× "
                                 f"(end to end {b32['tok_s']:.0f} tok/s = {b32['tok_s'] / chitchat['tok_s']:.0f}×)",
                        "met": ratio >= 100 and b32["decode_tok_s"] >= 250})
            if hfb:
                r = b32["tok_s"] / hfb["tok_s"]
                out.append({"target": f"{precision}: 32 chats ≥ 3× HF generate at batch {hfb['batch']}",
                            "value": f"{r:.1f}× end to end, {b32['decode_tok_s'] / hfb['decode_tok_s']:.1f}× decode",
                            "met": r >= 3})
        floor = floors.get(precision)
        if floor and floor["ratio"] is not None:
            out.append({"target": f"{precision}: batch-1 decode within 1.5× of the bandwidth floor",
                        "value": f"{floor['measured_ms']:.1f} ms/token vs floor {floor['floor_ms']:.1f} ms = {floor['ratio']:.2f}×",
                        "met": floor["ratio"] <= 1.5})
        b16, b1 = by.get((precision, "engine16")), by.get((precision, "engine1"))
        if b16 and b1:
            r = b16["p95_s"] / b1["p50_s"]
            out.append({"target": f"{precision}: p95 latency with 16 chats ≤ 3× a lone chat's",
                        "value": f"{b16['p95_s']:.2f} s vs {b1['p50_s']:.2f} s = {r:.2f}×", "met": r <= 3})
    limits = {"fp32": 1000, "int8": 500}
    for case in engines:
        limit = limits.get(case["precision"])
        if limit:
            lone = case["runs"].get("engine1", {})
            out.append({"target": f"{case['precision']}: RSS ≤ {limit / 1000:.1f} GB",
                        "value": f"{case['rss_serving_max_mb']:.0f} MB at most (busiest run), "
                                 f"{_fmt(lone.get('rss_mb'), '.0f')} MB serving 1 chat, "
                                 f"{_fmt(case.get('rss_started_mb'), '.0f')} MB ready and idle; "
                                 f"{case['rss_process_start_mb']:.0f} MB before loading the model",
                        "met": case["rss_serving_max_mb"] <= limit})
    return out


def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _features(m: dict) -> str:
    """" (AVX2, AVX-512F, …)" — the CPU's kernel-relevant instruction sets; "" when unknown (older JSON too)."""
    features = m.get("cpu_features") or []
    return f" ({', '.join(features)})" if features else ""


def _prefill_threads(cfg: dict) -> str:
    """How the engine's prefills were run ([engine] prefill_threads; runs before it had none: one thread)."""
    most = cfg.get("prefill_threads")
    if most is None:
        return "prefills on the engine's threads"
    if most == 0:
        return "prefills on the engine's threads plus the cores other processes left idle"
    return f"prefills on at most {most} thread(s)"


def format_report(results: dict, markdown: bool = False) -> str:
    """The tables `mynah bench` prints (markdown for docs/BENCHMARKS.md)."""
    s = summarize(results)
    m = results["machine"]
    cfg = results["config"]
    lines = []
    context = s["baselines"].get("context_tokens_mean")
    head = (f"model: {results['model']} ({s['baselines']['parameters'] / 1e6:.0f}M parameters); "
            f"contexts of ≤{cfg['context_tokens']} tokens (mean {_fmt(context)}), {cfg['new_tokens']} new tokens per reply; "
            f"{m['cpu'] or 'cpu'}{_features(m)}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads; "
            f"{_prefill_threads(cfg)}; "
            f"load average {m['loadavg'][0]:.2f} at start, {m.get('loadavg_end', m['loadavg'])[0]:.2f} at end")
    lines.append(head)
    lines.append("")
    cols = ["decode path", "precision", "tok/s", "decode tok/s", "p50 reply s", "p95 reply s", "RSS MB",
            "× chitchat", "× HF b1", "× HF batch"]
    table = []
    for r in s["rows"]:
        table.append([r["path"], r["precision"], _fmt(r["tok_s"]), _fmt(r["decode_tok_s"]), _fmt(r["p50_s"], ".2f"),
                      _fmt(r["p95_s"], ".2f"), _fmt(r["rss_mb"], ".0f"), _fmt(r["vs_chitchat"], ".1f"),
                      _fmt(r["vs_hf1"], ".2f"), _fmt(r["vs_hf_batch"], ".2f")])
    lines += _table(cols, table, markdown)
    lines.append("")
    bw = s["bandwidth"]
    lines.append(f"memory bandwidth: {bw['read_gb_s']:.1f} GB/s read (sum of a {bw['tensor_mb']} MB tensor), "
                 f"{bw['copy_gb_s']:.1f} GB/s copy, {bw['threads']} threads")
    lines.append("")
    floor_rows = [[p, _fmt(f["weight_mb"], ".0f"), _fmt(f["floor_ms"], ".1f"), _fmt(f["floor_tok_s"], ".0f"),
                   _fmt(f["measured_ms"], ".1f"), _fmt(f["ratio"], ".2f")] for p, f in s["floors"].items()]
    lines += _table(["precision", "weights read per token MB", "floor ms/token", "floor tok/s",
                     "engine batch-1 ms/token", "× floor"], floor_rows, markdown)
    q = s["quality"]
    if q:
        lines.append("")
        lines.append(f"int8 vs fp32 on {q['windows']} held-out chitchat dialogues ({q['tokens']} tokens): "
                     f"next-token agreement {100 * q['agreement']:.1f}%, loss {q['loss_fp32']:.4f} → {q['loss_int8']:.4f} "
                     f"({q['loss_int8'] - q['loss_fp32']:+.4f})")
    p = s["prefix"]
    if p:
        lines.append("")
        text = (f"prefix reuse: {p['reusable_turns']} of {p['bot_turns']} bot turns ({100 * p['reusable_fraction']:.0f}%) "
                f"could reuse the previous turn's KV cache with max_history_turns={cfg['max_history_turns']}")
        if "prefill_full_ms" in p:
            text += (f"; where it applies, prefill {p['prefill_full_ms']:.0f} ms → {p['prefill_suffix_ms']:.0f} ms "
                     f"({p['example_prefix_tokens']} of {p['example_context_tokens']} tokens cached) = "
                     f"{100 * p['saving_per_reusable_reply']:.0f}% of a lone reply; expected saving "
                     f"{100 * p['expected_saving_per_reply']:.1f}% per reply; cache {p['kv_mb_per_chat']:.1f} MB per chat")
        lines.append(text)
    lines.append("")
    lines.append("targets (issue 6; defined for the 124M shape):")
    lines.append("")
    lines += _table(["target", "measured", "met"],
                    [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in s["targets"]], markdown)
    from scripts.bench.versus import format_versus

    lines += format_versus(results, lambda cols, rows: _table(cols, rows, markdown))
    from scripts.bench.bot import format_bot
    from scripts.bench.llama import format_llama

    lines += format_bot(results, lambda cols, rows: _table(cols, rows, markdown))
    lines += format_llama(results, lambda cols, rows: _table(cols, rows, markdown))
    return "\n".join(lines)


def _table(cols: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
    return [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
