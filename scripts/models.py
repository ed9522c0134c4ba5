"""`mynah models`: the model versions in the registry, their metrics, and the last runs."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

NAME = "models"
HELP = "list the model versions (registry) with their metrics and the last training runs"


def add_arguments(parser) -> None:
    parser.add_argument("--runs", type=int, default=5, metavar="N", help="also show the last N training runs (default 5)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from bots.config import load_config
    from bots.durations import plural
    from bots.learning.report import describe_run, describe_version
    from engine.registry import Registry
    from storage import target_of

    config = load_config(args.config)
    registry = Registry(config.learning.registry)
    versions = registry.versions()
    active = registry.active_name()
    runs, lineage, tainted = asyncio.run(_records(target_of(config.storage), args.runs))
    if args.json:
        print(json.dumps({"registry": str(registry.root), "active": active,
                          "versions": [{**v.to_json(), "model_path": v.model_path,
                                        "lineage": lineage.get(v.name), "tainted": tainted.get(v.name)}
                                       for v in versions],
                          "tainted": tainted, "runs": runs}, indent=2, default=str))
        return 0
    if not versions:
        print(f"no versions in {registry.root} yet: the bot registers [model] path ({config.model.path}) as v0001 "
              "when it starts with [learning] enabled = true, and so does `mynah retrain`")
    else:
        print(f"registry {registry.root} ({plural(len(versions), 'version')}; * = active):")
        for v in reversed(versions):
            line = describe_version(v, active)
            if v.name in lineage:
                line += (f"; trained on {plural(lineage[v.name]['messages'], 'message')} of "
                         f"{plural(lineage[v.name]['users'], 'user')}")
            if v.awaiting_approval:
                line += f"; awaiting approval (mynah promote {v.name})"
            print(line + (f"; TAINTED: {tainted[v.name]}" if v.name in tainted else ""))
            if v.kind == "fine-tuned" and v.loss_curve:
                print(f"        loss curve: {v.loss_curve}")
    gone = sorted(set(tainted) - {v.name for v in versions})
    if gone:
        print(f"retired and deleted after /forget (tainted): {', '.join(gone)}")
    if runs:
        print("last training runs:")
        for r in runs:
            print(f"  {describe_run(r)}")
    return 0


async def _records(path: str, limit: int) -> tuple[list[dict], dict, dict]:
    """(the last `limit` runs, each version's lineage, the tainted versions) from the database."""
    from storage import is_postgres
    from storage.db import StorageError
    from storage.store import open_store

    if not is_postgres(path) and (path == ":memory:" or not Path(path).exists()):
        return [], {}, {}

    try:
        store = await open_store(path)
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return [], {}, {}
    try:
        runs = await store.runs.training_runs(limit) if limit > 0 else []
        return runs, await store.trust.lineage(), await store.trust.tainted()
    finally:
        await store.close()
