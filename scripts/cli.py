"""The `mynah` command: one entry point, one module per subcommand.

Each subcommand module defines NAME, HELP, ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS = [
    "scripts.chat",
    "scripts.run",
    "scripts.preprocess",
    "scripts.train",
    "scripts.generate",
    "scripts.eval",
    "scripts.bench",
    "scripts.retrain",
    "scripts.models",
    "scripts.rollback",
    "scripts.promote",
    "scripts.backup",
    "scripts.restore",
    "scripts.export",
    "scripts.feedback",
    "scripts.migrate",
    "scripts.copy_storage",
    "scripts.demo",
]


def _load_subcommands():
    modules = []
    for name in SUBCOMMANDS:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a missing dependency, not a missing subcommand
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mynah", description="Mynah: a self-hosted chit-chat bot that learns from its conversations.")
    parser.add_argument("--config", default=None, help="config file (default ./config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _load_subcommands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def quiet_libraries() -> None:
    """Keep transformers' load bars and advice out of the chat and the logs. Through the environment,
    which transformers reads when (and if) it is imported: importing it here to say so cost a lean-served
    bot (engine.lean) ~20 MB of RSS for a package it never uses. Set values win."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # transformers' own bars follow the hub's
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def skip_httpx_cli() -> None:
    """httpx imports its command-line client (click, rich, pygments: ~80 modules, ~5.5 MB of RSS) on
    import whenever those packages are installed (huggingface_hub's CLI brings them). Mynah never runs
    it: marking the module absent takes the path httpx itself takes without them (a stub `httpx.main`)."""
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its lines carry the bot token in URLs
    quiet_libraries()
    skip_httpx_cli()
    from bots.config import ConfigError

    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"mynah: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
