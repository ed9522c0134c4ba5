"""`mynah retrain`: one learning-loop run now, against the configured database and registry.

    mynah retrain            # only when [learning] min_new_messages new user messages arrived
    mynah retrain --force    # regardless

Prints the trainer's progress and the result (held-out and base-corpus losses before and
after, the decision, the loss-curve picture's path). A running bot notices a promotion
within [learning] poll_seconds and hot-swaps the new version. Works whether or not
[learning] enabled is set: enabled only switches the bot's schedule and admin commands.

Exit status: 0 the run finished (promoted or rejected), 1 it failed, 3 skipped (too little
new data, or another run holds the lock).
"""
from __future__ import annotations

import asyncio
import getpass
import sys

NAME = "retrain"
HELP = "fine-tune on the logged conversations now and promote the result if it is better"


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true", help="run even with fewer than [learning] min_new_messages new user messages")
    parser.add_argument("--quiet", action="store_true", help="print only the result")


def progress_printer(out=None):
    """A progress listener that prints one readable line per trainer event (to `out`, or to
    whatever sys.stdout is when it prints: a default bound at import time would go stale)."""
    from bots.dashboard.progress import describe
    from engine.training.events import Event, RunEnded, Train

    state = {"last_step_print": 0.0}

    def show(event: "Event") -> None:
        import time

        run = f"run #{event.run_id if event.run_id is not None else '?'}"
        line = None
        if isinstance(event, Train) and event.kind == "eval" and event.valid_loss is not None:
            line = (f"{run}: step {event.step}/{event.total_steps}: validation loss {event.valid_loss:.4f}, "
                    f"{event.elapsed_s:.0f}s")
        elif isinstance(event, Train) and event.kind == "step" and time.time() - state["last_step_print"] > 15:
            state["last_step_print"] = time.time()
            line = f"{run}: step {event.step}/{event.total_steps}: train loss {event.train_loss:.4f}"
        elif not isinstance(event, (Train, RunEnded)):
            text = describe(event)
            line = text and f"{run}: {text.removeprefix('stage: ').removeprefix('data: ')}"
        if line:
            print(line, file=out or sys.stdout, flush=True)

    return show


async def retrain(config, *, force: bool, quiet: bool = False, trigger: str | None = None):
    """Run once; returns (exit status, RunResult or None)."""
    from bots.learning.canary import CanaryServing
    from bots.learning.loop import AlreadyRunning, Learning
    from bots.learning.report import RunStatus
    from engine.registry import Registry
    from bots.app import open_configured_store

    registry = Registry(config.learning.registry)
    active, changed = await asyncio.to_thread(registry.ensure_configured, config.model.path)
    if changed:
        print(f"registered [model] path {config.model.path} as {active.name} (now active)")
    store = await open_configured_store(config)
    learning = Learning(config, registry, store, canary=CanaryServing())  # a running bot serves it
    try:
        await learning.start(schedule=False)
        if not quiet:
            learning.add_progress_listener(progress_printer())
        try:
            result = await learning.run_once(trigger or f"cli:{getpass.getuser()}", force=force)
        except AlreadyRunning as exc:
            print(f"mynah: {exc}; try again when it has finished", file=sys.stderr)
            return 3, None
        if result is None:
            print(f"nothing to do: {learning.schedule.last_check[1]} (--force runs anyway)")
            return 3, None
        print(result.summary())
        if result.loss_curve:
            print(f"loss curve: {result.loss_curve}")
        return (0 if result.ok else 3 if result.status == RunStatus.SKIPPED else 1), result
    finally:
        await learning.stop()
        await store.close()


def run(args) -> int:
    from bots.config import load_config
    from storage.db import StorageError

    config = load_config(args.config)
    try:
        code, _ = asyncio.run(retrain(config, force=args.force, quiet=args.quiet))
    except StorageError as exc:
        print(f"mynah: {exc}", file=sys.stderr)
        return 1
    return code
