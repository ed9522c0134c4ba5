"""What crosses the trainer's process boundary: one typed record per event, one reader.

The child (engine.training.finetune) writes each event as one JSON line on stdout and its
outcome as result.json; the parent (bots/learning) and every listener (the dashboard's
Training page, `mynah retrain`) read them back with `read_event` and match on the class,
so a field renamed on one side is an error here instead of a silently missing key.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Started:
    """The child is up (its pid: the parent stops it by its process group)."""
    pid: int
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Stage:
    """A step of the run begins ("evaluating the active model", "training", …)."""
    stage: str
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Data:
    """How many dialogues each split holds, after dropping what /forget removed."""
    train: int
    held_out: int
    base_eval: int
    dropped_forgotten: int = 0
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Scored:
    """A model's losses on the held-out and base-corpus dialogues (side: before | after)."""
    side: str
    held_out: float | None = None
    base: float | None = None
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Train:
    """One progress report of engine.training.train (kind: step | eval | done)."""
    kind: str
    step: int = 0
    total_steps: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_valid_loss: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    lr: float | None = None
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Finished:
    """The child's outcome (also result.json): the numbers on success, the reason otherwise."""
    ok: bool
    error: str = ""
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    finite: bool = False
    counts: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    candidate: str = ""
    base_model: str = ""
    launched_by_accelerate: bool = False
    loss_curve: str = ""
    duration_s: float = 0.0
    max_resident_mb: int | None = None
    probes: dict = field(default_factory=dict)
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class RunEnded:
    """The parent's last word on a run (the learning loop sends it to its listeners)."""
    status: str
    decision: str
    reason: str = ""
    run_id: int | None = None
    time: float = field(default_factory=time.time)


Event = Started | Stage | Data | Scored | Train | Finished | RunEnded

KINDS: dict[str, type] = {"started": Started, "stage": Stage, "data": Data, "scored": Scored, "train": Train,
                          "finished": Finished, "result": RunEnded}
_NAMES = {cls: name for name, cls in KINDS.items()}


def to_json(event: Event) -> str:
    """One line: the record's fields plus its kind."""
    return json.dumps({"kind": _NAMES[type(event)], **asdict(event)})


def from_dict(raw: dict) -> Event | None:
    """The record `raw` describes, or None for an unknown kind; unknown fields are dropped."""
    if not isinstance(raw, dict):
        return None
    cls = KINDS.get(raw.get("kind"))
    if cls is None:
        return None
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        return None


def read_event(line: str | bytes) -> Event | None:
    """The one reader: a stdout line (or result.json's text) back into its record; None for
    anything else (a stray print, a half-written line)."""
    try:
        return from_dict(json.loads(line))
    except ValueError:
        return None
