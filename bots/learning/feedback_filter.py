"""Feedback in training: replies people disliked are left out, liked ones may count twice.

`[learning] feedback_weighting`:
* "off":    the export is what it was before feedback existed;
* "drop":   (default) every bot reply whose outcome is negative (an explicit 👎-style
            reaction or button, or, without any explicit one, a /reset right after it or a
            short "what?"-style answer) is cut out of its dialogue: the turns before it and
            the turns after it become separate dialogues (each kept only with 2+ turns), so
            the model never sees the disliked reply as a target, nor as context;
* "weight": "drop", and training dialogues that hold a positively rated reply (and no
            negative one) are trained on twice. Only the training split is weighted, never
            the held-out set, and at most once per dialogue, so one user's likes can at most
            double that user's share (the per-user caps of the learning-trust rules apply to
            the result).

Outcomes come from storage/feedback.py (implicit signals are derived by the feedback
monitor in bots/learning/canary.py); a reply not yet evaluated counts as neutral.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from storage.feedback import Feedback


@dataclass
class FeedbackFiltered:
    new: list
    old: list
    counts: dict = field(default_factory=dict)
    positive: set = field(default_factory=set)    # first_message_id of dialogues worth weighting up
    mode: str = "off"

    def weighted(self, train: list) -> list:
        """The training split with positively rated dialogues once more ("weight" only)."""
        if self.mode != "weight":
            return train
        extra = [d for d in train if d.first_message_id in self.positive]
        self.counts["feedback_weighted_up"] = len(extra)
        return train + extra


def split_out(dialogue, negative: set[int], roles: dict[int, str], min_turns: int = 2) -> list:
    """The dialogue without its negative bot turns: the pieces between them with 2+ turns.

    Turns are rebuilt from the message ids exactly as export merged them (consecutive
    messages of one side are one turn), so a piece's turns and ids stay aligned."""
    turn_ids: list[list[int]] = []
    prev_role = None
    for mid in dialogue.message_ids:
        role = roles.get(mid)
        if role != prev_role or not turn_ids:
            turn_ids.append([])
        turn_ids[-1].append(mid)
        prev_role = role
    if len(turn_ids) != len(dialogue.turns):   # should not happen; never guess: keep it whole
        return [dialogue]
    pieces, current = [], []
    for turn, ids in zip(dialogue.turns, turn_ids):
        if negative.intersection(ids):
            pieces.append(current)
            current = []
        else:
            current.append((turn, ids))
    pieces.append(current)
    out = []
    for piece in pieces:
        if len(piece) >= min_turns:
            ids = [i for _, group in piece for i in group]
            out.append(replace(dialogue, turns=[t for t, _ in piece], first_message_id=ids[0],
                               last_message_id=ids[-1], message_ids=ids))
    return out


async def apply(conversations, lc, new: list, old: list) -> FeedbackFiltered:
    """Cut negatively rated replies out of the new and replayed dialogues (see the docstring)."""
    mode = getattr(lc, "feedback_weighting", "off")
    if mode == "off":
        return FeedbackFiltered(new, old)
    store = Feedback(conversations.db)
    ids = {i for d in new + old for i in d.message_ids}
    outcomes = await store.outcomes(ids)
    negative = {i for i, o in outcomes.items() if o < 0}
    positive_ids = {i for i, o in outcomes.items() if o > 0}
    touched = [d for d in new + old if negative.intersection(d.message_ids)]
    roles = await store.roles({i for d in touched for i in d.message_ids})

    def cut(dialogues: list) -> list:
        out = []
        for d in dialogues:
            out += split_out(d, negative, roles) if negative.intersection(d.message_ids) else [d]
        return out

    newest_last = lambda d: d.last_message_id  # noqa: E731  (the held-out slice is the newest)
    result = FeedbackFiltered(sorted(cut(new), key=newest_last), sorted(cut(old), key=newest_last), mode=mode)
    result.positive = {d.first_message_id for d in result.new + result.old
                       if positive_ids.intersection(d.message_ids)}
    result.counts = {"feedback_negative_cut": len(negative), "feedback_positive": len(positive_ids)}
    return result
