"""The trainer's events across the process boundary: typed records, one reader."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from engine.training.events import (KINDS, Data, Finished, RunEnded, Scored, Stage, Started, Train, from_dict,
                                    read_event, to_json)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("event", [
    Started(123, run_id=4), Stage("training"), Data(10, 3, 2, dropped_forgotten=1), Scored("before", 2.5, None),
    Train("eval", step=5, total_steps=9, valid_loss=1.25), RunEnded("done", "promoted", "better", run_id=4),
    Finished(ok=True, before={"held_out": 2.0}, after={"held_out": 1.5}, probes={"active": []}),
    Finished(ok=False, error="disk full")])
def test_every_event_survives_the_round_trip(event):
    assert read_event(to_json(event)) == event
    assert read_event(to_json(event).encode()) == event


def test_the_reader_ignores_what_is_not_an_event():
    assert read_event("not json") is None
    assert read_event('{"type": "nope"}') is None
    assert read_event('[1, 2]') is None
    newer = from_dict({"type": "stage", "stage": "x", "time": 5.0, "added_later": 1})   # dropped, not an error
    assert newer == Stage("x", time=5.0)
    assert set(KINDS) == {"started", "stage", "data", "scored", "train", "finished", "result"}


def test_no_string_keyed_event_dispatch_is_left():
    """Events are matched by class: no event["event"] / event.get("event") in bots/ or engine/."""
    found = []
    for path in [*(ROOT / "bots").rglob("*.py"), *(ROOT / "engine").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            key = None
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and node.args and isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
            if key == "event":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_learning_and_dashboard_name_no_platform():
    """The learning loop and the dashboard are platform-blind: no platform name in their strings."""
    found = []
    for folder in ("bots/learning", "bots/dashboard"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                        and any(p in node.value.lower() for p in ("telegram", "discord")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found
