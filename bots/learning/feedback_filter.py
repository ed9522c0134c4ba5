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


@dataclass
class FeedbackFiltered:
    rows: list                                    # curate.Row, disliked replies cut out
    counts: dict = field(default_factory=dict)
    positive: set = field(default_factory=set)    # ids of positively rated bot replies
    mode: str = "off"

    def weighted(self, train: list) -> list:
        """The training split with positively rated dialogues once more ("weight" only)."""
        if self.mode != "weight":
            return train
        extra = [d for d in train if self.positive.intersection(r.id for r in d.rows)]
        self.counts["feedback_weighted_up"] = len(extra)
        return train + extra


def cut_rows(rows: list, negative: set[int]) -> list:
    """The rows without the negative bot replies; each cut starts a new segment of its chat
    (Row.epoch is renumbered as a segment counter), so the turns before a disliked reply and
    the turns after it become separate dialogues and neither sees it as context."""
    out, segment, last = [], {}, {}
    for r in sorted(rows, key=lambda r: (r.chat_id, r.id)):
        if r.chat_id not in segment or last[r.chat_id] != r.epoch:
            segment[r.chat_id] = segment.get(r.chat_id, -1) + 1
            last[r.chat_id] = r.epoch
        if r.role == "bot" and r.id in negative:
            segment[r.chat_id] += 1
            continue
        out.append(replace(r, epoch=segment[r.chat_id]))
    return out


async def apply(feedback, lc, rows: list) -> FeedbackFiltered:
    """Cut negatively rated replies out of the rows the export reads (see the docstring)."""
    mode = getattr(lc, "feedback_weighting", "off")
    if mode == "off" or not rows:
        return FeedbackFiltered(rows)
    outcomes = await feedback.outcomes({r.id for r in rows if r.role == "bot"})
    negative = {i for i, o in outcomes.items() if o < 0}
    positive = {i for i, o in outcomes.items() if o > 0}
    return FeedbackFiltered(cut_rows(rows, negative), {"feedback_negative_cut": len(negative),
                                                       "feedback_positive": len(positive)}, positive, mode)
