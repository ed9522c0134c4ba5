"""A running retrain as the Training page shows it: the learning loop's progress events,
kept as short readable lines (the latest step separately, so steps do not flood them)."""
from __future__ import annotations

import collections
import time

from engine.training.events import Data, Event, RunEnded, Scored, Stage, Train

MAX_LINES = 40


def describe(event: Event) -> str | None:
    """One line per event worth a line (the same facts `mynah retrain` prints)."""
    match event:
        case Stage():
            return f"stage: {event.stage}"
        case Data():
            return f"data: {event.train} training / {event.held_out} held-out / {event.base_eval} base-corpus dialogues"
        case Scored(held_out=float() | int()):
            who = "active model" if event.side == "before" else "candidate"
            base = f", base-corpus loss {event.base:.4f}" if event.base is not None else ""
            return f"{who}: held-out loss {event.held_out:.4f}{base}"
        case Train(kind="eval", valid_loss=float() | int()):
            return f"step {event.step}/{event.total_steps}: validation loss {event.valid_loss:.4f}"
        case RunEnded():
            reason = f": {event.reason}" if event.reason else ""
            return f"result: {event.decision or event.status}{reason}"
    return None


class Progress:
    """A progress listener (Learning.add_progress_listener) that remembers recent events."""

    def __init__(self):
        self.lines: collections.deque[dict] = collections.deque(maxlen=MAX_LINES)
        self.step: dict | None = None           # the latest training step event
        self.last_result: dict | None = None    # the latest run's end
        self.active = True                      # False once the dashboard stopped (listeners stay registered)

    def __call__(self, event: Event) -> None:
        if not self.active:
            return
        run_id = event.run_id
        if isinstance(event, Train):
            self.step = {"run_id": run_id, "step": event.step, "total_steps": event.total_steps,
                         "train_loss": event.train_loss, "at": time.time()}
        line = describe(event)
        if line is not None:
            self.lines.append({"run_id": run_id, "at": time.time(), "line": line})
        if isinstance(event, RunEnded):
            self.last_result = {"run_id": run_id, "status": event.status, "decision": event.decision,
                                "reason": event.reason, "at": time.time()}

    def for_run(self, run_id) -> list[str]:
        return [item["line"] for item in self.lines if run_id is None or item["run_id"] == run_id]
