"""`mynah promote VERSION`: serve a candidate that passed every check and waits for approval
([learning] require_approval = true).

Like `mynah rollback` it only moves the pointer (after test-loading the model); a running
bot notices within [learning] poll_seconds and hot-swaps. A version trained on data that
/forget removed (tainted) is never promoted.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

NAME = "promote"
HELP = "serve a model version that waits for approval ([learning] require_approval)"


def add_arguments(parser) -> None:
    parser.add_argument("version", help="the waiting version, e.g. 4 or v0004 (`mynah models` lists them)")


def run(args) -> int:
    from bots.config import load_config
    from engine.registry import Registry, RegistryError, parse_version

    config = load_config(args.config)
    registry = Registry(config.learning.registry)
    try:
        version = registry.get(parse_version(args.version))
        if version.name in asyncio.run(_tainted(config.storage.path)):
            raise RegistryError(f"{version.name} was trained on forgotten data and can never be served")
        if not version.metrics.get("awaiting_approval"):
            raise RegistryError(f"{version.name} is not waiting for approval (use `mynah rollback` to switch)")
        from engine.model import ModelLoadError, load_model

        try:
            load_model(version.model_path, fmt=config.model.format, device="cpu")
        except ModelLoadError as exc:
            raise RegistryError(f"{version.name} does not load: {exc}") from None
        version, old = registry.rollback(version.name, "approved with mynah promote")
    except RegistryError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(f"active: {version.name} (was {old}); a running bot switches within {config.learning.poll_seconds:g} s")
    return 0


async def _tainted(path: str) -> dict[str, str]:
    if path == ":memory:" or not Path(path).exists():
        return {}
    from storage.db import Database
    from storage.trust import TrustStore

    db = await Database.open(path)
    try:
        return await TrustStore(db).tainted()
    finally:
        await db.close()
