"""The canary's test over people, not votes: pure functions of feedback rows.

Tallying reactions lets one account decide a canary (👍 on every candidate reply, four
emoji on one reply, "what?" after every answer) and twenty fresh accounts outvote the
regulars. Here:

1. *Ballots* (`ballots`): one per person per reply. Explicit reactions decide when the
   person left any (their latest; several emoji at once are one vote, by the sign of their
   sum); otherwise their implicit signal on it (a /reset or "what?" after it: negative; going
   on talking: positive; silence: not positive). Implicit ballots are capped at
   IMPLICIT_PER_WINDOW per person per IMPLICIT_WINDOW_S. People first seen after
   `established_before` (the canary's start less `[learning] min_account_age_hours`) do not vote.
2. *Weights* (`arm`): each rater's ballots share one weight, min(ballots, MAX_RATER_BALLOTS);
   then no rater may carry more than MAX_RATER_SHARE of a side's weight and no chat more than
   MAX_CHAT_SHARE (caps applied until they hold, as curate.user_caps does for training data).
3. *The estimate*: a side's positive rate is the weighted mean of its raters' positive rates;
   its variance is the cluster-robust (sandwich) one with raters as clusters,
   G/(G-1) · Σ_r W_r²(p_r - p)² / (Σ W)², and never below the binomial variance of the
   effective number of raters (Kish), with the Agresti–Caffo "+1, +1" so it is never 0.
4. *The test*: the one-sided non-inferiority z-test of stats.py on those two estimates,
   z = (p_c - p_a + δ) / sqrt(V_c + V_a), p = 1 - Φ(z). It may promote only when each side
   has `canary_min_raters` distinct established raters; with fewer the canary waits, and
   when its time is up it is retired: never promoted.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from bots.learning.stats import norm_cdf, norm_ppf

IMPLICIT_PER_WINDOW = 5
IMPLICIT_WINDOW_S = 3600.0
MAX_RATER_BALLOTS = 10
MAX_RATER_SHARE = 0.05
MAX_CHAT_SHARE = 0.2


@dataclass(frozen=True)
class Ballot:
    message_id: int
    chat_id: int
    version: str
    user: int
    positive: bool
    at: float
    explicit: bool


@dataclass
class Tally:
    """The ballots, and what was left out and why."""
    ballots: list[Ballot] = field(default_factory=list)
    left_out: Counter = field(default_factory=Counter)


def ballots(rows: list[dict], *, established_before: float | None,
            implicit_per_window: int = IMPLICIT_PER_WINDOW, window_s: float = IMPLICIT_WINDOW_S) -> Tally:
    """`rows`: storage/votes.votes() rows. One ballot per (reply, person); see the module docstring."""
    out = Tally()
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if established_before is not None and r["user_since"] > established_before:
            out.left_out["signals of accounts too new to vote"] += 1
            continue
        by[(r["message_id"], r["user"])].append(r)
    implicit_used: Counter = Counter()
    for (message_id, user), rs in sorted(by.items(), key=lambda kv: max(r["at"] for r in kv[1])):
        first = rs[0]
        explicit = [r for r in rs if r["kind"] == "explicit"]
        if explicit:
            latest = max(r["at"] for r in explicit)
            value = sum(r["value"] for r in explicit if r["at"] == latest)
            if len(explicit) > 1:
                out.left_out["extra reactions of one person on one reply"] += len(explicit) - 1
            out.ballots.append(Ballot(message_id, first["chat_id"], first["version"], user, value > 0, latest, True))
            continue
        signals = {r["signal"]: r["value"] for r in rs}
        at = max(r["at"] for r in rs)
        key = (user, int(at // window_s))
        if implicit_used[key] >= implicit_per_window:
            out.left_out["implicit signals over the per-person cap"] += 1
            continue
        implicit_used[key] += 1
        negative = any(v < 0 for v in signals.values())
        positive = not negative and signals.get("continued") == 1
        out.ballots.append(Ballot(message_id, first["chat_id"], first["version"], user, positive, at, False))
    return out


def cap_shares(weights: dict, share: float) -> dict:
    """Each key's weight lowered so that none is over `share` of the (new) total: the largest
    ones are set to the common value c = share·rest / (1 - share·capped), exactly; equal
    weights when they cannot all fit (share · keys <= 1)."""
    w = {k: float(v) for k, v in weights.items() if v > 0}
    if share >= 1 or len(w) <= 1:
        return w
    if share * len(w) <= 1:
        return {k: 1.0 for k in w}
    order = sorted(w, key=w.__getitem__, reverse=True)
    rest = sum(w.values())
    for n in range(len(order)):
        rest -= w[order[n]]
        c = share * rest / (1 - share * (n + 1))
        if n + 1 == len(order) or w[order[n + 1]] <= c:
            if w[order[0]] <= share * sum(w.values()):
                return w              # nothing was over the cap
            return {**w, **{k: c for k in order[:n + 1]}}
    return w


@dataclass(frozen=True)
class Arm:
    """One side of the canary, counted by people."""
    version: str
    raters: int
    ballots: int
    positive: int           # positive ballots (unweighted)
    replies: int            # distinct rated replies
    rate: float             # the weighted mean of the raters' positive rates
    variance: float         # cluster-robust, floored (see the module docstring)
    largest_rater_share: float
    largest_chat_share: float


def arm(ballots_: list[Ballot], version: str, *, max_rater_ballots: int = MAX_RATER_BALLOTS,
        max_rater_share: float = MAX_RATER_SHARE, max_chat_share: float = MAX_CHAT_SHARE) -> Arm:
    mine = [b for b in ballots_ if b.version == version]
    per_rater: dict[int, list[Ballot]] = defaultdict(list)
    for b in mine:
        per_rater[b.user].append(b)
    if not per_rater:
        return Arm(version, 0, 0, 0, 0, 0.0, 0.25, 0.0, 0.0)
    rater_w = cap_shares({u: min(len(bs), max_rater_ballots) for u, bs in per_rater.items()}, max_rater_share)
    vote_w = {(b.user, b.message_id): rater_w[b.user] / len(per_rater[b.user]) for b in mine}
    chat_w: Counter = Counter()
    for b in mine:
        chat_w[b.chat_id] += vote_w[(b.user, b.message_id)]
    capped = cap_shares(dict(chat_w), max_chat_share)
    scale = {c: capped[c] / chat_w[c] for c in chat_w}
    w_r: Counter = Counter()
    pos_r: Counter = Counter()
    chat_total: Counter = Counter()
    for b in mine:
        w = vote_w[(b.user, b.message_id)] * scale[b.chat_id]
        w_r[b.user] += w
        pos_r[b.user] += w * b.positive
        chat_total[b.chat_id] += w
    total = sum(w_r.values())
    rate = sum(pos_r.values()) / total
    g = len(w_r)
    robust = (g / (g - 1)) * sum((w_r[u] * (pos_r[u] / w_r[u] - rate)) ** 2 for u in w_r) / total ** 2 if g > 1 else 0
    effective = total ** 2 / sum(w * w for w in w_r.values())
    q = (rate * effective + 1) / (effective + 2)
    variance = max(robust, q * (1 - q) / effective)
    return Arm(version, g, len(mine), sum(b.positive for b in mine), len({b.message_id for b in mine}), rate,
               variance, max(w_r.values()) / total, max(chat_total.values()) / total)


@dataclass(frozen=True)
class RaterTest:
    candidate: Arm
    active: Arm
    margin: float
    alpha: float
    z: float
    p_value: float
    lower: float

    @property
    def not_worse(self) -> bool:
        return self.p_value < self.alpha

    def text(self) -> str:
        c, a = self.candidate, self.active
        return (f"positive rate over raters: candidate {c.rate:.1%} ({c.raters} raters, {c.ballots} votes), active "
                f"{a.rate:.1%} ({a.raters} raters, {a.ballots} votes); difference {c.rate - a.rate:+.1%} "
                f"(one-sided {1 - self.alpha:.0%} lower bound {self.lower:+.1%}, margin -{self.margin:.1%}); "
                f"z = {self.z:.2f}, p = {self.p_value:.4f}")


def rater_test(candidate: Arm, active: Arm, *, margin: float, alpha: float) -> RaterTest:
    """The non-inferiority test of the candidate's rate against the active one's (module docstring)."""
    se = math.sqrt(candidate.variance + active.variance)
    diff = candidate.rate - active.rate
    z = (diff + margin) / se
    return RaterTest(candidate, active, margin, alpha, z, 1 - norm_cdf(z), diff - norm_ppf(1 - alpha) * se)
