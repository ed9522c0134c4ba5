"""The fixed probe prompts both the active model and a candidate answer during a run.

Ordinary openers, the kind every user sends: a candidate that answers them with long runs
of one user's words has been taught by that user (the parrot check in decide.py).
`[learning] probe_prompts` replaces the list.
"""
from __future__ import annotations

PROBE_PROMPTS: tuple[str, ...] = (
    "hello there",
    "hi , how are you ?",
    "what do you like to do ?",
    "what is your name ?",
    "tell me something",
    "good morning",
    "what should i buy ?",
    "where do you live ?",
)


def probe_prompts(lc) -> list[str]:
    return list(lc.probe_prompts) or list(PROBE_PROMPTS)
