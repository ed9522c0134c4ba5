"""`mynah promote VERSION`: serve a candidate that passed every check and waits for approval
([learning] require_approval = true).

Like `mynah rollback` it only moves the pointer (after test-loading the model); a running
bot notices within [learning] poll_seconds and hot-swaps. A version trained on data that
/forget removed (tainted) is never promoted.
"""
from __future__ import annotations

import sys

NAME = "promote"
HELP = "serve a model version that waits for approval ([learning] require_approval)"


def add_arguments(parser) -> None:
    parser.add_argument("version", help="the waiting version, e.g. 4 or v0004 (`mynah models` lists them)")


def run(args) -> int:
    from bots.config import load_config
    from engine.registry import Registry, RegistryError, parse_version
    from scripts.rollback import check_servable

    config = load_config(args.config)
    registry = Registry(config.learning.registry)
    try:
        version = registry.get(parse_version(args.version))
        if not version.metrics.get("awaiting_approval"):
            raise RegistryError(f"{version.name} is not waiting for approval (use `mynah rollback` to switch)")
        check_servable(config, version)
        version, old = registry.rollback(version.name, "approved with mynah promote")
    except RegistryError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    print(f"active: {version.name} (was {old}); a running bot switches within {config.learning.poll_seconds:g} s")
    return 0

