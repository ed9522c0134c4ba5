"""Whether a candidate may replace the active model: a pure function of the numbers.

The trainer scores the active model and the candidate on the same held-out dialogues and
the same fixed base-corpus sample. A candidate is promoted only when the held-out loss fell
by the margin (it learned what is new), the gain is broad (the held-out set comes from
contributors the candidate never trained on, and most of them must gain: `gain_breadth`),
and the base-corpus loss rose by no more than the tolerance (it did not forget how to
talk). Anything NaN or infinite is never promoted.
No I/O here, so every rule is testable with plain numbers; the checks that need the
world (a /forget during the run, the candidate loading, the pointer moving) come after,
in the loop and in promote.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum


class Decision(StrEnum):
    """What a run decided; the values are the strings the training_runs rows keep."""
    PROMOTED = "promoted"
    REJECTED = "rejected"
    SKIPPED = "skipped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANARY = "canary"                # passed the offline gate; now judged by feedback (canary.py)


@dataclass(frozen=True)
class Verdict:
    decision: Decision               # PROMOTED or REJECTED
    reason: str

    @property
    def promoted(self) -> bool:
        return self.decision is Decision.PROMOTED


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(before: dict, after: dict, finite: bool, *, margin: float, tolerance: float) -> Verdict:
    """`before`/`after`: {"held_out": loss, "base": loss or None}; `finite`: the candidate's
    weights are all finite. Promoted only when every rule passes; else the first that fails."""
    if not finite or not (_finite(before.get("held_out")) and _finite(after.get("held_out"))):
        return Verdict(Decision.REJECTED, "the candidate produced NaN or infinite values")
    gain = before["held_out"] - after["held_out"]
    if gain < margin:
        return Verdict(Decision.REJECTED, f"held-out loss {before['held_out']:.4f} → {after['held_out']:.4f} is not "
                                          f"better by the margin {margin:g}")
    if before.get("base") is not None and after.get("base") is not None:
        if not math.isfinite(after["base"]):
            return Verdict(Decision.REJECTED, "the candidate produced NaN or infinite values on the base corpus")
        rise = after["base"] - before["base"]
        if rise > tolerance:
            return Verdict(Decision.REJECTED,
                           f"base-corpus loss rose {before['base']:.4f} → {after['base']:.4f} (+{rise:.4f}), "
                           f"more than the tolerance {tolerance:g}: it would forget too much")
    narrow = gain_breadth(before.get("groups") or {}, after.get("groups") or {})
    if narrow is not None:
        return Verdict(Decision.REJECTED, narrow)
    return Verdict(Decision.PROMOTED, f"held-out loss fell by {gain:.4f} (margin {margin:g})")


GAIN_MINORITY_SHARE = 0.8     # the most of the held-out gain a minority of contributors may account for


def gain_breadth(before: dict, after: dict, *, minority_share: float = GAIN_MINORITY_SHARE) -> str | None:
    """Why the held-out gain is too narrow, or None. `before`/`after`: each held-out contributor's
    loss. A candidate must help at least half of them, and a minority of them (fewer than half)
    may not account for more than `minority_share` of the gain: what it learned must serve
    most people, not the few it resembles."""
    keys = sorted(k for k in set(before) & set(after) if _finite(before[k]) and _finite(after[k]))
    n = len(keys)
    if n < 2:
        return None
    gains = sorted((before[k] - after[k] for k in keys), reverse=True)
    improved = sum(g > 0 for g in gains)
    if 2 * improved < n:
        return (f"its gains concentrate on a minority of contributors: the held-out loss fell for only {improved} "
                f"of {n} held-out contributors")
    minority, positive = (n - 1) // 2, sum(g for g in gains if g > 0)
    if minority and positive > 0:
        share = sum(max(g, 0.0) for g in gains[:minority]) / positive
        if share > minority_share:
            return (f"its gains concentrate on a minority of contributors: {share:.0%} of the held-out gain comes "
                    f"from {minority} of {n} held-out contributors (at most {minority_share:.0%} may)")
    return None


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def parrot_hits(replies: list[str], texts: list[str], n: int) -> int:
    """How many n-word runs of `replies` also occur in `texts`."""
    known = {g for t in texts for g in ngrams(t, n)}
    return sum(1 for r in replies for g in ngrams(r, n) if g in known)


def parrot(candidate: list[str], active: list[str], user_texts: dict[str, list[str]], *, n: int = 4,
           ratio: float = 3.0, min_hits: int = 3) -> Verdict | None:
    """The parrot check: a candidate whose sampled probe replies repeat long runs of one
    user's words far more often than the active model's replies do (at least `min_hits`
    and more than `ratio` times as many) was taught by that user; None when nobody is parroted.

    `candidate`/`active`: the two models' replies to the same probe prompts with the same
    seeds; `user_texts`: each user's new training messages."""
    worst: tuple[int, int, str] | None = None
    for user, texts in user_texts.items():
        got, base = parrot_hits(candidate, texts, n), parrot_hits(active, texts, n)
        if got >= min_hits and got > ratio * base and (worst is None or got > worst[0]):
            worst = (got, base, user)
    if worst is None:
        return None
    got, base, user = worst
    return Verdict(Decision.REJECTED, f"it parrots one user ({user}): {got} runs of {n}+ of their words in its "
                                      f"replies to the probe prompts, against {base} from the active model")
