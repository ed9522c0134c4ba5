"""Prompts cut from held-out dialogues, shared by `mynah eval`'s comparison and its quality report."""
from __future__ import annotations

import random


def held_out_prompts(dialogues, n: int, valid_fraction: float, split_seed: int, max_turns: int, seed: int,
                     cuts: int = 1) -> list[dict]:
    """Up to n (context, reference) pairs from the held-out dialogues: `cuts` random cuts per
    dialogue, the turns before a cut as the context, the turn after it as the human reference."""
    from engine.training.data import split_by_conversation

    _, valid = split_by_conversation(dialogues, valid_fraction, split_seed)
    rng = random.Random(seed)
    prompts = []
    for dialogue in valid:
        points = [rng.randint(1, len(dialogue) - 1)] if cuts == 1 else \
            sorted(rng.sample(range(1, len(dialogue)), min(cuts, len(dialogue) - 1)))
        for cut in points:
            context = dialogue[max(0, cut - max_turns):cut]
            turns = [("user" if (len(context) - i) % 2 else "bot", t) for i, t in enumerate(context)]
            prompts.append({"turns": turns, "reference": dialogue[cut], "dialogue": dialogue})
    return prompts[:n]
