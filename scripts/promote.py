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
    from scripts.rollback import make_active

    config = load_config(args.config)
    registry = Registry(config.learning.registry)
    try:
        version = registry.get(parse_version(args.version))
        if not version.awaiting_approval:
            raise RegistryError(f"{version.name} is not waiting for approval (use `mynah rollback` to switch)")
    except RegistryError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    return make_active(config, registry, version, "approved with mynah promote")
