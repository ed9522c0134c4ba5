"""`mynah rollback [VERSION]`: make a version (default: the previously active one) active.

A running bot notices the new pointer within [learning] poll_seconds and hot-swaps to it
between batches; no restart needed. The version is test-loaded first (skip with
--no-check), so the pointer never names a model that does not load, and a version trained
on data that /forget removed (tainted) is never served again.
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

NAME = "rollback"
HELP = "make the previous (or a given) model version active; a running bot switches within seconds"


def add_arguments(parser) -> None:
    parser.add_argument("version", nargs="?", help="e.g. 3 or v0003 (default: the version active before this one)")
    parser.add_argument("--no-check", action="store_true", help="do not test-load the model first")


def run(args) -> int:
    from bots.config import load_config
    from engine.registry import Registry, RegistryError, parse_version
    from storage import target_of

    config = load_config(args.config)
    registry = Registry(config.learning.registry)
    try:
        name = parse_version(args.version) if args.version else registry.previous()
        if name is None:
            raise RegistryError("there is no previous version to roll back to")
        version = registry.get(name)
    except RegistryError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    return make_active(config, registry, version, "rollback by mynah rollback", load=not args.no_check)


def make_active(config, registry, version, reason: str, *, load: bool = True) -> int:
    """The CLI's last step for `mynah rollback` and `mynah promote`: check, move the pointer, say so."""
    from engine.registry import RegistryError

    try:
        check_servable(config, version, load=load)
        version, old = registry.rollback(version.name, reason)
    except RegistryError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    bot = served_by(registry.root)
    if bot is None:
        print(f"active: {version.name} (was {old}); no bot is running, it serves {version.name} when it starts")
        return 0
    wait_s = 2 * config.learning.poll_seconds + 60   # its next poll, plus loading the model
    if wait_until_served(registry.root, version.name, wait_s):
        print(f"active: {version.name} (was {old}); the running bot now serves it")
        return 0
    print(f"active: {version.name} (was {old}); the running bot (pid {bot['pid']}) still serves {bot['version']} "
          f"after {wait_s:g} s: see its log (the model may not load there)", file=sys.stderr)
    return 1


def served_by(root) -> dict | None:
    """What a running bot on this registry serves ({"version", "pid"}), or None when none runs."""
    import json
    import os

    from bots.learning.promote import SERVING_FILE

    try:
        info = json.loads((Path(root) / SERVING_FILE).read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def wait_until_served(root, name: str, timeout_s: float) -> bool:
    """Whether the running bot serves `name` within `timeout_s` (it swaps between batches)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = served_by(root)
        if info is None or info.get("version") == name:
            return info is not None
        time.sleep(0.1)
    return False


def check_servable(config, version, *, load: bool = True) -> None:
    """RegistryError unless `version` may be served: not tainted by /forget, and it loads."""
    from engine.registry import RegistryError
    from storage import target_of

    if version.name in asyncio.run(tainted_versions(target_of(config.storage))):
        raise RegistryError(f"{version.name} was trained on forgotten data and can never be served")
    if load:
        from engine.model import ModelLoadError, load_model

        try:
            load_model(version.model_path, fmt=config.model.format, device="cpu")
        except ModelLoadError as exc:
            raise RegistryError(f"{version.name} does not load: {exc}") from None


async def tainted_versions(path: str) -> dict[str, str]:
    """{version: why} of the versions /forget retired (none when there is no database yet)."""
    from storage import is_postgres, open_database
    from storage.trust import TrustStore

    if not is_postgres(path) and (path == ":memory:" or not Path(path).exists()):
        return {}
    db = await open_database(path)
    try:
        return await TrustStore(db).tainted()
    finally:
        await db.close()
