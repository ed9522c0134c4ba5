"""`mynah feedback`: how people reacted to each model version's replies.

Per version: replies, rated replies (an explicit reaction or an evaluated implicit window),
positive and negative shares, explicit reactions, the continuation rate (the user wrote
again within [feedback] implicit_window_minutes) and the mean conversation length; rates
come with 95% Wilson intervals. Implicit signals of replies whose window has passed are
derived first (the running bot does the same every minute).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

NAME = "feedback"
HELP = "per-version feedback: replies, positive, negative, continuation rate, with confidence intervals"


def _hours(text: str) -> float:
    """argparse's check of --hours: a number, 0 (all) or more."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not hours >= 0:    # also NaN
        raise argparse.ArgumentTypeError("must be 0 (all) or more")
    return hours


def add_arguments(parser) -> None:
    parser.add_argument("--hours", type=_hours, default=0, metavar="H", help="only replies of the last H hours")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from bots.config import load_config
    from bots.feedback import table_rows, table_text

    config = load_config(args.config)
    from storage import is_postgres, target_of

    path = target_of(config.storage)
    if not is_postgres(path) and path != ":memory:" and not Path(path).exists():
        print(f"mynah: no database at {path} yet: nothing has been said", file=sys.stderr)
        return 1
    rows = table_rows(asyncio.run(_summary(config, args.hours)))
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print(table_text(rows))
    return 0


async def _summary(config, hours: float) -> dict:
    from bots.feedback import FeedbackRecorder
    from storage import open_database
    from storage.feedback import Feedback, summarize

    db = await open_database(config.storage)
    try:
        recorder = FeedbackRecorder(config.feedback, Feedback(db))
        await recorder.derive()
        since = time.time() - hours * 3600 if hours > 0 else None
        return summarize(await recorder.store.scores(since=since, with_lengths=True))
    finally:
        await db.close()
