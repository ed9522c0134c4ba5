"""The canary simulation table: honest raters and attacks, decided by the vote-counting test
of the last round and by the rater-level test (bots/learning/canary_stats.py).

Each scenario is written into a real SQLite database through storage/ (chats, users, bot
replies of the two versions, reactions through Feedback.set_signals, "what?" answers turned
into implicit signals by derive_implicit), then read back with storage/votes.py exactly as
the canary does. Usage:

    python -m scripts.canary_sim            # the table (markdown)
"""
from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bots.learning import canary_stats
from bots.learning.stats import non_inferiority
from storage.db import Database
from storage.store import Store
from storage.votes import votes

CANDIDATE, ACTIVE = "v0002", "v0001"
MARGIN, ALPHA, MIN_RATERS, AGE_HOURS = 0.05, 0.05, 30, 24.0
OLD = 30 * 86400          # how long ago the established accounts were first seen


@dataclass(frozen=True)
class Scenario:
    name: str
    candidate_rate: float       # the honest raters' chance of 👍 on the candidate's replies
    active_rate: float
    raters: int = 40            # honest raters per side
    replies: int = 5            # replies each honest rater rates
    attack: str = ""            # "stack" | "fresh" | "what" | ""


SCENARIOS = [
    Scenario("honest, worse candidate", 0.70, 0.85),
    Scenario("honest, better candidate", 0.90, 0.80),
    Scenario("worse + one account 👍👍👍👍 on every candidate reply", 0.70, 0.85, attack="stack"),
    Scenario("worse + 20 fresh accounts 👍 on every candidate reply", 0.972, 0.987, attack="fresh"),
    Scenario("better + one account answering \"what?\" to every candidate reply", 0.90, 0.80, attack="what"),
    Scenario("better, only 20 honest raters a side", 0.95, 0.80, raters=20),
]


@dataclass
class Row:
    scenario: str
    old: tuple                  # (replies c, positive c, replies a, positive a, z, p, decision)
    new: tuple                  # (raters c, raters a, rate c, rate a, z, p, decision)


async def established(db: Database, when: float, platform_user_id: str | None = None) -> None:
    """Backdate accounts' first-seen time (all of them, or one)."""
    async with db.transaction() as conn:
        if platform_user_id is None:
            await conn.execute("UPDATE users SET created_at = ?", (when,))
        else:
            await conn.execute("UPDATE users SET created_at = ? WHERE platform_user_id = ?", (when, platform_user_id))


async def _reply(store: Store, chat: int, user: int, version: str, tag: str, n: int) -> str:
    await store.messages.log_message(chat, "user", "hello there", user_id=user)
    await store.messages.log_message(chat, "bot", f"reply {n}", model_version=version,
                                     platform_message_id=f"{tag}-{n}")
    return f"{tag}-{n}"


async def build(db: Database, s: Scenario, seed: int = 1) -> float:
    """Write the scenario; returns when the canary began."""
    conv = Store.over(db)
    fb, rng = conv.feedback, random.Random(seed)
    started = time.time() - 1
    candidate_replies: list[tuple[str, str]] = []
    for side, version, rate in (("c", CANDIDATE, s.candidate_rate), ("a", ACTIVE, s.active_rate)):
        for i in range(s.raters):
            key = f"{side}{i}"
            chat, user = await conv.chats.chat("telegram", key), await conv.chats.user("telegram", key)
            for n in range(s.replies):
                pid = await _reply(conv, chat, user, version, key, n)
                emoji = "👍" if rng.random() < rate else "👎"
                await fb.set_signals("telegram", key, pid, key, {f"reaction:{emoji}": 1 if emoji == "👍" else -1})
                if side == "c":
                    candidate_replies.append((key, pid))
    await established(db, started - OLD)                                       # the regulars are established
    if s.attack == "stack":
        await conv.chats.user("telegram", "troll")
        await established(db, started - OLD, "troll")
        for key, pid in candidate_replies:
            for emoji in ("👍", "❤", "🔥", "💯"):
                await fb.set_signals("telegram", key, pid, "troll", {f"reaction:{emoji}": 1})
    elif s.attack == "fresh":
        for k in range(20):
            for key, pid in candidate_replies:
                await fb.set_signals("telegram", key, pid, f"fresh{k}", {"reaction:👍": 1})
    elif s.attack == "what":
        troll = await conv.chats.user("telegram", "troll")
        await established(db, started - OLD, "troll")
        for i in range(s.raters):
            chat = await conv.chats.chat("telegram", f"c{i}")
            for n in range(s.replies):
                await _reply(conv, chat, troll, CANDIDATE, f"c{i}w", n)
                await conv.messages.log_message(chat, "user", "what?", user_id=troll)
        await fb.derive_implicit(300, now=time.time() + 301)
    return started


def old_test(rows: list[dict]) -> tuple:
    """The last round's test: every reaction a vote (a reply's outcome is the sign of the sum of
    all its explicit values, whoever gave them), replies counted, not people."""
    by: dict[int, list[dict]] = {}
    for r in rows:
        by.setdefault(r["message_id"], []).append(r)
    tally = {CANDIDATE: [0, 0], ACTIVE: [0, 0]}
    for rs in by.values():
        explicit = [r["value"] for r in rs if r["kind"] == "explicit"]
        implicit = {r["signal"]: r["value"] for r in rs if r["kind"] == "implicit"}
        if explicit:
            positive = sum(explicit) > 0
        elif "continued" in implicit:
            positive = implicit["continued"] == 1 and not any(v < 0 for v in implicit.values())
        else:
            continue
        side = tally[rs[0]["version"]]
        side[0] += 1
        side[1] += positive
    (n_c, k_c), (n_a, k_a) = tally[CANDIDATE], tally[ACTIVE]
    test = non_inferiority(k_c, n_c, k_a, n_a, margin=MARGIN, alpha=ALPHA)
    return (n_c, k_c, n_a, k_a, test.z, test.p_value, "promote" if test.not_worse else "retire")


def new_test(rows: list[dict], started: float) -> tuple:
    tally = canary_stats.ballots(rows, established_before=started - AGE_HOURS * 3600)
    c, a = canary_stats.arm(tally.ballots, CANDIDATE), canary_stats.arm(tally.ballots, ACTIVE)
    test = canary_stats.rater_test(c, a, margin=MARGIN, alpha=ALPHA)
    if min(c.raters, a.raters) < MIN_RATERS:
        decision = f"wait / retire (< {MIN_RATERS} raters)"
    else:
        decision = "promote" if test.not_worse else "retire"
    return (c.raters, a.raters, c.positive, c.ballots, a.positive, a.ballots, c.rate, a.rate, test.z, test.p_value,
            decision)


async def run(s: Scenario, folder: Path) -> Row:
    db = await Database.open(folder / f"{abs(hash(s.name))}.sqlite3")
    try:
        started = await build(db, s)
        rows = await votes(db, since=started, versions=[CANDIDATE, ACTIVE])
        return Row(s.name, old_test(rows), new_test(rows, started))
    finally:
        await db.close()


async def table(scenarios=SCENARIOS) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        return [await run(s, Path(tmp)) for s in scenarios]


def markdown(rows: list[Row]) -> str:
    out = ["| scenario | old: replies c (pos) / a (pos) | old z, p | old decision | raters c / a | "
           "votes c (pos) / a (pos) | rate c / a | z | p | decision |", "|" + "---|" * 10]
    for r in rows:
        o, n = r.old, r.new
        out.append(f"| {r.scenario} | {o[0]} ({o[1]}) / {o[2]} ({o[3]}) | {o[4]:.2f}, {o[5]:.4f} | {o[6]} | "
                   f"{n[0]} / {n[1]} | {n[3]} ({n[2]}) / {n[5]} ({n[4]}) | {n[6]:.1%} / {n[7]:.1%} | {n[8]:.2f} | "
                   f"{n[9]:.4f} | {n[10]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    print(markdown(asyncio.run(table())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
