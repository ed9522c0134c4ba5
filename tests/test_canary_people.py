"""A canary is decided by people, not by votes: one vote per person per reply, established
accounts only, implicit signals capped, no rater or chat weighing too much, and at least
`canary_min_raters` raters a side. Real SQLite through storage/ (scripts/canary_sim.py),
and the real Canary of a running bot for the attacks."""
from __future__ import annotations

import random
import time

import pytest

from bots.learning import canary_stats
from bots.learning.canary_stats import Ballot, arm, ballots, cap_shares, rater_test
from scripts.canary_sim import SCENARIOS, Scenario, established, markdown, table
from tests.test_canary import _start, _talk
from tests.test_learning import base_model  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(300)


def vote(message_id, user, value, at, *, kind="explicit", signal="reaction:👍", since=0.0, chat=1, version="c"):
    return {"message_id": message_id, "chat_id": chat, "version": version, "user": user, "kind": kind,
            "signal": signal, "value": value, "at": at, "user_since": since}


def test_one_vote_per_person_per_reply_their_latest():
    rows = [vote(1, 7, 1, 10.0, signal="reaction:👍"), vote(1, 7, 1, 10.0, signal="reaction:🔥"),
            vote(1, 7, 1, 10.0, signal="reaction:💯"), vote(1, 7, 1, 10.0, signal="reaction:❤"),
            vote(2, 7, 1, 10.0), vote(2, 7, -1, 20.0, signal="reaction:👎"),      # changed their mind: 👎
            vote(2, 8, -1, 5.0, kind="implicit", signal="reset"), vote(2, 8, 1, 6.0, kind="implicit",
                                                                         signal="continued")]
    tally = ballots(rows, established_before=None)
    got = {(b.message_id, b.user): b.positive for b in tally.ballots}
    assert got == {(1, 7): True, (2, 7): False, (2, 8): False}        # four emoji: one vote
    assert tally.left_out["extra reactions of one person on one reply"] == 4


def test_fresh_accounts_do_not_vote_and_implicit_signals_are_capped():
    rows = [vote(i, 1, 1, 100.0 + i, since=50.0) for i in range(3)]                      # established
    rows += [vote(i, 2, 1, 100.0 + i, since=500.0) for i in range(3)]                    # fresh
    rows += [vote(10 + i, 3, -1, 1000.0 + i, kind="implicit", signal="short_negative", since=0) for i in range(40)]
    tally = ballots(rows, established_before=100.0)
    users = [b.user for b in tally.ballots]
    assert 2 not in users and users.count(1) == 3
    assert users.count(3) == canary_stats.IMPLICIT_PER_WINDOW
    assert tally.left_out["signals of accounts too new to vote"] == 3
    assert tally.left_out["implicit signals over the per-person cap"] == 40 - canary_stats.IMPLICIT_PER_WINDOW


def test_no_rater_or_chat_carries_more_than_its_cap():
    assert cap_shares({"a": 100, "b": 1, "c": 1}, 0.5) == {"a": 2.0, "b": 1.0, "c": 1.0}
    assert cap_shares({"a": 3, "b": 1}, 0.4) == {"a": 1.0, "b": 1.0}      # cannot fit: equal
    rng = random.Random(0)
    bs = [Ballot(1000 + i, i, "c", i, rng.random() < 0.6, 0.0, True) for i in range(40)]
    bs += [Ballot(5000 + k, 99, "c", 99, True, 0.0, True) for k in range(500)]        # one account, 500 replies
    one = arm(bs, "c")
    assert one.raters == 41 and one.largest_rater_share <= canary_stats.MAX_RATER_SHARE + 1e-9
    assert one.largest_chat_share <= canary_stats.MAX_CHAT_SHARE + 1e-9
    assert abs(one.rate - arm(bs[:40], "c").rate) < 0.05          # the flood barely moves the rate
    # a chat with many raters weighs at most MAX_CHAT_SHARE of the side
    crowd = [Ballot(i, 1 if i < 30 else 2 + i, "c", i, i < 30, 0.0, True) for i in range(45)]
    assert arm(crowd, "c").largest_chat_share <= canary_stats.MAX_CHAT_SHARE + 1e-9
    assert arm(crowd, "c").rate < 30 / 45


def test_rater_test_by_hand():
    same = [Ballot(i, i, v, i if v == "c" else 100 + i, i % 2 == 0, 0.0, True) for v in "ca" for i in range(60)]
    test = rater_test(arm(same, "c"), arm(same, "a"), margin=0.05, alpha=0.05)
    assert abs(test.candidate.rate - 0.5) < 1e-9 and abs(test.z - 0.05 / (2 * 0.25 / 60) ** 0.5) < 0.05
    assert not test.not_worse and "z = " in test.text() and "60 raters" in test.text()


async def test_the_simulation_table_attacks_do_not_decide_honest_raters_do():
    rows = {r.scenario: r for r in await table()}
    print("\n" + markdown(list(rows.values())))
    decision = {name: r.new[-1] for name, r in rows.items()}
    old = {name: r.old[-1] for name, r in rows.items()}
    names = [s.name for s in SCENARIOS]
    assert decision[names[0]] == "retire" and decision[names[1]] == "promote"        # honest preference decides
    assert old[names[2]] == "promote" and decision[names[2]] == "retire"            # stacked 👍 by one account
    assert old[names[3]] == "promote" and decision[names[3]] == "retire"            # twenty fresh accounts
    assert old[names[4]] == "retire" and decision[names[4]] == "promote"            # one account's "what?"
    assert old[names[5]] == "promote" and decision[names[5]].startswith("wait")     # too few raters


@pytest.mark.parametrize("raters", [30, 45])
async def test_a_better_candidate_with_enough_honest_raters_is_promoted(raters):
    (row,) = await table([Scenario("better", 0.92, 0.75, raters=raters)])
    assert row.new[0] >= 30 and row.new[-1] == "promote", markdown([row])


async def test_a_running_canary_ignores_stacked_and_fresh_votes_and_waits_for_raters(tmp_path, tiny_dialogpt):
    """The real Canary of a running bot: a worse candidate with one established account's stacked
    👍 on every reply and twenty fresh accounts' 👍 is retired; with too few raters it waits."""
    app, candidate, active, _ = await _start(tmp_path, tiny_dialogpt, canary_share=0.5, canary_min_replies=20,
                                             canary_min_raters=30, min_account_age_hours=24)
    try:
        canary, rng = app.learning.canary, random.Random(3)
        replies = await _talk(app, range(160))
        await established(app.db, time.time() - 30 * 86400)             # the regulars and the troll: old
        assert await canary.check() is None                            # nobody rated yet: it waits
        for i, (version, pid) in replies.items():
            rate = 0.35 if version == candidate else 0.8
            emoji = "👍" if rng.random() < rate else "👎"
            await app.feedback.add_reaction("telegram", f"c{i}", pid, f"u{i}", emoji)
        await app.store.chats.user("telegram", "troll")
        await established(app.db, time.time() - 30 * 86400, "troll")
        for i, (version, pid) in replies.items():
            if version == candidate:
                for emoji in ("👍", "❤", "🔥", "💯"):
                    await app.feedback.add_reaction("telegram", f"c{i}", pid, "troll", emoji)
                for k in range(20):
                    await app.feedback.add_reaction("telegram", f"c{i}", pid, f"fresh{k}", "👍")
        summary = await canary.summary()
        assert summary["raters_candidate"] >= 30 and summary["raters_active"] >= 30
        assert summary["left_out"]["signals of accounts too new to vote"] >= 20
        lines = "\n".join(await app.learning.status_lines())
        assert "raters:" in lines and "on the candidate" in lines
        assert await canary.check() == "retired"
        assert "worse" in canary.last[1] and "raters" in canary.last[1]
    finally:
        await app.close()


async def test_a_replys_outcome_counts_people_not_emoji(tmp_path):
    """Training's feedback filter and the per-version table read this outcome: four 👍 of one
    user against three users' 👎 is negative."""
    from storage.db import Database
    from storage.store import Store

    db = await Database.open(tmp_path / "f.sqlite3")
    try:
        store = Store.over(db)
        chat, user = await store.chats.chat("telegram", "g"), await store.chats.user("telegram", "a")
        await store.messages.log_message(chat, "user", "hello there", user_id=user)
        mid = await store.messages.log_message(chat, "bot", "hi", model_version="v0001", platform_message_id="r1")
        for emoji in ("👍", "❤", "🔥", "💯"):
            await store.feedback.set_signals("telegram", "g", "r1", "fan", {f"reaction:{emoji}": 1})
        for k in range(3):
            await store.feedback.set_signals("telegram", "g", "r1", f"critic{k}", {"reaction:👎": -1})
        (score,) = await store.feedback.scores()
        assert (score.message_id, score.explicit_count, score.explicit_sum, score.outcome) == (mid, 7, -2, -1)
    finally:
        await db.close()
