"""A running retrain as the Training page shows it: the learning loop's progress events,
kept as short readable lines (the latest step separately, so steps do not flood them)."""
from __future__ import annotations

import collections
import time

MAX_LINES = 40


def describe(event: dict) -> str | None:
    """One line per event worth a line (the same facts `mynah retrain` prints)."""
    kind = event.get("event")
    if kind == "stage":
        return f"stage: {event.get('stage')}"
    if kind == "data":
        return (f"data: {event.get('train', '?')} training / {event.get('held_out', '?')} held-out / "
                f"{event.get('base_eval', '?')} base-corpus dialogues")
    if kind in ("before", "after") and event.get("held_out") is not None:
        who = "active model" if kind == "before" else "candidate"
        base = f", base-corpus loss {event['base']:.4f}" if event.get("base") is not None else ""
        return f"{who}: held-out loss {event['held_out']:.4f}{base}"
    if kind == "train" and event.get("kind") == "eval" and event.get("valid_loss") is not None:
        return f"step {event.get('step')}/{event.get('total_steps')}: validation loss {event['valid_loss']:.4f}"
    if kind == "result":
        reason = f": {event['reason']}" if event.get("reason") else ""
        return f"result: {event.get('decision') or event.get('status')}{reason}"
    return None


class Progress:
    """A progress listener (Learning.add_progress_listener) that remembers recent events."""

    def __init__(self):
        self.lines: collections.deque[dict] = collections.deque(maxlen=MAX_LINES)
        self.step: dict | None = None           # the latest training step event
        self.last_result: dict | None = None    # the latest "result" event
        self.active = True                      # False once the dashboard stopped (listeners stay registered)

    def __call__(self, event: dict) -> None:
        if not self.active:
            return
        run_id = event.get("run_id")
        if event.get("event") == "train":
            self.step = {"run_id": run_id, "step": event.get("step"), "total_steps": event.get("total_steps"),
                         "train_loss": event.get("train_loss"), "at": time.time()}
        line = describe(event)
        if line is not None:
            self.lines.append({"run_id": run_id, "at": time.time(), "line": line})
        if event.get("event") == "result":
            self.last_result = {"run_id": run_id, "status": event.get("status"), "decision": event.get("decision"),
                                "reason": event.get("reason", ""), "at": time.time()}

    def for_run(self, run_id) -> list[str]:
        return [item["line"] for item in self.lines if run_id is None or item["run_id"] == run_id]
