"""`mynah bench`'s tables against CTranslate2 and while training, with the issue-15 targets checked.

Ratios are Mynah / CTranslate2 time (below 1.0: Mynah is faster), each pair measured back
to back (the CTranslate2 case runs just before Mynah's engine case of the same precision).
"""
from __future__ import annotations


def _f(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def versus_rows(results: dict) -> tuple[list[list[str]], list[dict]]:
    """Rows of the Mynah-vs-CTranslate2 table and the targets they decide."""
    cases = results["cases"]
    rows, targets = [], []
    for ct in (c for c in cases if c["kind"] == "ct2"):
        precision = ct["precision"]
        engine = next((c for c in cases if c["kind"] == "engine" and c["precision"] == precision), None)
        if engine is None:
            continue
        runs = engine["runs"]
        lone = runs.get("engine1")
        burst = runs.get(f"burst{ct['burst']['n']}")
        pairs = []
        if lone:
            pairs.append(("lone reply, p50", lone["p50_s"], ct["lone"]["p50_s"], 1.0))
        if burst:
            pairs.append((f"{ct['burst']['n']} chats at once until all answered vs one batch of {ct['burst']['n']}",
                          burst["seconds"], ct["burst"]["seconds"], 1.0))
        stag, ct_stag = runs.get("staggered"), ct.get("staggered")
        if stag and ct_stag:
            best = ct_stag["best"]
            pairs.append((f"staggered arrivals ({stag['replies']} messages, mean gap {ct_stag['mean_gap_s']:.3f} s), "
                          f"p95 (CTranslate2: best window {best['window_s']:g} s)", stag["p95_s"], best["p95_s"], 1 / 1.5))
        for name, mine, theirs, limit in pairs:
            ratio = mine / theirs
            rows.append([name, precision, _f(mine), _f(theirs), _f(ratio)])
            goal = "≤ 1.0×" if limit == 1.0 else "p95 ≥ 1.5× better than"
            targets.append({"target": f"{precision}: {name.split(' (')[0]} {goal} CTranslate2",
                            "value": f"{mine:.2f} s vs {theirs:.2f} s = {ratio:.2f}×", "met": ratio <= limit + 1e-9})
    return rows, targets


def training_rows(results: dict) -> tuple[list[list[str]], list[dict]]:
    rows, targets = [], []
    for engine in (c for c in results["cases"] if c["kind"] == "engine" and "training" in c["runs"]):
        t = engine["runs"]["training"]
        quiet = t["quiet"]["p95_s"]
        child = f"child fine-tuning the model (nice {t['nice']}, 1 thread)"
        rows.append([f"quiet (engine on {t['threads'] or 'default'} threads)", engine["precision"],
                     _f(t["quiet"]["p50_s"]), _f(quiet), "1.00"])
        for key, label in (("paused", f"{child}, paused while the engine works (shipped default)"),
                           ("one_thread", f"{child}, engine on {t['threads_while_training']} thread(s) instead"),
                           ("nothing", f"{child}, neither")):
            rows.append([label, engine["precision"], _f(t[key]["p50_s"]), _f(t[key]["p95_s"]), _f(t[key]["ratio_p95"])])
        targets.append({"target": f"{engine['precision']}: chat p95 during a retrain ≤ 2× a quiet bot's (shipped defaults)",
                        "value": f"{t['paused']['p95_s']:.2f} s vs {quiet:.2f} s = {t['paused']['ratio_p95']:.2f}× "
                                 f"(one engine thread instead: {t['one_thread']['ratio_p95']:.2f}×, "
                                 f"neither: {t['nothing']['ratio_p95']:.2f}×)",
                        "met": t["paused"]["ratio_p95"] <= 2.0})
    return rows, targets


def staggered_detail(results: dict) -> list[list[str]]:
    out = []
    for ct in (c for c in results["cases"] if c["kind"] == "ct2" and "staggered" in c):
        for r in ct["staggered"]["runs"]:
            out.append([f"CTranslate2, window {r['window_s']:g} s", ct["precision"], _f(r["p50_s"]), _f(r["p95_s"])])
        engine = next((c for c in results["cases"] if c["kind"] == "engine" and c["precision"] == ct["precision"]), None)
        if engine and "staggered" in engine["runs"]:
            r = engine["runs"]["staggered"]
            out.append(["Mynah engine (continuous batching)", ct["precision"], _f(r["p50_s"]), _f(r["p95_s"])])
    return out


def format_versus(results: dict, table) -> list[str]:
    """The tables (using report._table for the layout); empty when nothing here was measured."""
    lines: list[str] = []
    rows, targets = versus_rows(results)
    if rows:
        lines += ["", "Mynah vs CTranslate2 on the same model and prompts (seconds; ratio = Mynah / CTranslate2):", ""]
        lines += table(["run", "precision", "Mynah s", "CTranslate2 s", "ratio"], rows)
    detail = staggered_detail(results)
    if detail:
        lines += ["", "staggered arrivals, reply latency from arrival:", ""]
        lines += table(["server", "precision", "p50 s", "p95 s"], detail)
    t_rows, t_targets = training_rows(results)
    if t_rows:
        lines += ["", "a lone chat while the model trains next to it (reply seconds):", ""]
        lines += table(["condition", "precision", "p50 s", "p95 s", "p95 × quiet"], t_rows)
    targets += t_targets
    if targets:
        lines += ["", "targets (issue 15):", ""]
        lines += table(["target", "measured", "met"], [[t["target"], t["value"], "yes" if t["met"] else "NO"]
                                                        for t in targets])
    return lines
