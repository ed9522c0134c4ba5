"""The small names and facts every part of engine/ shares (no torch here).

Defined here and nowhere else in engine/, bots/ or scripts/ (the dashboard's percentiles
use this one too), so "a turn" or "a model's context limit" means the same thing in
serving, training, scoring, the dashboard and the benchmarks. bots/ and scripts/ may import
this; storage/ keeps its own row types (storage.messages.StoredTurn) and never imports it.
"""
from __future__ import annotations

import math
from typing import Iterable

# One line of a chat as the engine sees it: (role, text), role "user" or "bot", oldest first.
Turn = tuple[str, str]

# One conversation for training: its utterances, oldest first, speakers alternating.
Dialogue = list[str]

DEFAULT_POSITIONS = 1024  # GPT-2's, for a config that names no limit


def max_positions(model_or_config) -> int:
    """How many positions the model attends over: GPT-2 configs call it n_positions, most
    others max_position_embeddings. Takes a model (anything with .config) or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    return (getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            or DEFAULT_POSITIONS)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) with linear interpolation between neighbours (numpy's
    default), so p50 of [1, 2] is 1.5; None for no values (nothing measured yet)."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"a quantile must be in [0, 1], got {q}")
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
