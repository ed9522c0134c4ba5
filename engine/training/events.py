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


@dataclass(kw_only=True)
class _Event:
    """Every event: the run it belongs to (the parent tags it) and when it happened."""
    run_id: int | None = None
    time: float = field(default_factory=time.time)


@dataclass
class Started(_Event):
    """The child is up (its pid: the parent stops it by its process group)."""
    pid: int


@dataclass
class Stage(_Event):
    """A step of the run begins ("evaluating the active model", "training", …)."""
    stage: str


@dataclass
class Data(_Event):
    """How many dialogues each split holds, after dropping what /forget removed."""
    train: int
    held_out: int
    base_eval: int
    dropped_forgotten: int = 0


@dataclass
class Scored(_Event):
    """A model's losses on the held-out and base-corpus dialogues (side: before | after)."""
    side: str
    held_out: float | None = None
    base: float | None = None


@dataclass
class Train(_Event):
    """One progress report of engine.training.train (kind: step | eval | done)."""
    kind: str
    step: int = 0
    train_loss: float | None = None
    total_steps: int = 0
    valid_loss: float | None = None
    tokens: int = 0
    best_valid_loss: float | None = None
    elapsed_s: float = 0.0
    lr: float | None = None


@dataclass
class Finished(_Event):
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


@dataclass
class RunEnded(_Event):
    """The parent's last word on a run (the learning loop sends it to its listeners)."""
    status: str
    decision: str
    reason: str = ""


Event = Started | Stage | Data | Scored | Train | Finished | RunEnded

KINDS: dict[str, type] = {"started": Started, "stage": Stage, "data": Data, "scored": Scored, "train": Train,
                          "finished": Finished, "result": RunEnded}
_NAMES = {cls: name for name, cls in KINDS.items()}


def to_json(event: Event) -> str:
    """One line: the record's fields plus its type's name."""
    return json.dumps({"type": _NAMES[type(event)], **asdict(event)})


def from_dict(raw: dict) -> Event | None:
    """The record `raw` describes, or None for an unknown type; unknown fields are dropped."""
    if not isinstance(raw, dict):
        return None
    cls = KINDS.get(raw.get("type"))
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
