"""Learning no small group can steer: accounts acting in concert count as one contributor,
a phrase only one contributor pushes is masked, fresh accounts do not count, the yardstick
comes from other contributors and a narrow gain is rejected. Pure rules first, then real
trainer runs on the tiny model (scripts/puppet_sim.py builds the scenario)."""
from __future__ import annotations

import random

import pytest

from bots.learning import coalitions
from bots.learning.coalitions import common_bigrams, link, mask_phrases
from bots.learning.curate import Row, curate
from bots.learning.decide import Decision, decide, gain_breadth
from scripts.puppet_sim import FAST, PAYLOAD, QUESTIONS, scenario
from tests.test_learning import base_model  # noqa: F401  (fixture)

BASE = [["hello there", "hi , how are you ?"], ["how are you ?", "i am fine , thanks"],
        ["what do you like to do ?", "i like to read"], ["do you have a dog ?", "yes , a small dog"],
        ["where do you live ?", "i live in a city"], ["what is your name ?", "my name is sam"],
        ["good morning", "good morning to you"], ["see you later", "see you later"]] * 2
COMMON = common_bigrams(BASE)


def messages(n_honest=8, n_puppets=5, seed=0):
    rng, out = random.Random(seed), []
    for i in range(n_honest):
        out += [(f"t:h{i}", rng.choice(QUESTIONS)) for _ in range(9)]
    for i in range(n_puppets):
        out += [(f"t:p{i}", f"{rng.choice(QUESTIONS)} , {PAYLOAD}") for _ in range(9)]
    return out


def test_puppets_sharing_a_rare_phrase_are_one_contributor_and_the_phrase_is_masked():
    links = link(messages(), COMMON)
    assert links.groups == [[f"t:p{i}" for i in range(5)]]
    assert {links.of(f"t:p{i}") for i in range(5)} == {"group:t:p0+4"}
    assert all(links.of(f"t:h{i}") == f"t:h{i}" for i in range(8))          # ordinary talk links nobody
    assert links.reasons["shared rare phrases"] == 4
    assert {("zorp", "vexa"), ("vexa", "quill")} <= links.lone_phrases
    # the payload and the word pairs around it only the puppets use ("there zorp") become one placeholder
    assert mask_phrases(f"hello there , {PAYLOAD} !", links.lone_phrases) == "hello [phrase] !"
    assert mask_phrases("a zorp b", {("zorp", "b")}) == "a [phrase]"
    assert links.summary()["linked_group_members"] == [[f"t:p{i}" for i in range(5)]]


def test_links_to_one_domain_and_near_identical_messages_link_accounts():
    spam = "what do you like to do today"        # one rare pair ("do today"), said once each
    msgs = [("t:a", "great deals at https://shop.evilpills.shop/x"), ("t:b", "look: evilpills.shop/y now"),
            ("t:c", spam), ("t:d", spam + " friend"), ("t:e", "hello there"),
            ("t:f", "see bbc.co.uk"), ("t:g", "how are you ?")]
    links = link(msgs, COMMON)
    assert sorted(links.groups) == [["t:a", "t:b"], ["t:c", "t:d"]]
    assert links.reasons == {"links to the same domain": 1, "near-identical messages": 1}


def test_one_honest_users_unusual_words_used_once_are_kept():
    links = link([("t:x", "my cat zorblax sleeps"), ("t:y", "hello there")], COMMON)
    assert not links.groups and not links.lone_phrases       # said once: not a pushed phrase


def rows_of(msgs, since=0.0):
    out, i = [], 1
    chat = {}
    for user, text in msgs:
        c = chat.setdefault(user, len(chat) + 1)
        out += [Row(i, c, "user", text, created_at=i, user=user, user_since=since),
                Row(i + 1, c, "bot", "indubitably", created_at=i + 1)]
        i += 2
    return out


def test_curate_counts_the_coalition_once_and_never_trains_the_payload():
    cur = curate(rows_of(messages()), after=0, banned=[], max_user_share=0.2, held_out_fraction=0.2, seed=1,
                 common=COMMON)
    text = " ".join(r.text for d in cur.train + cur.held_out for r in d.rows)
    assert "zorp" not in text and "[phrase]" in text
    owners = {r.who for d in cur.train for r in d.rows if r.role == "user"}
    assert len(owners) <= 8 and "group:t:p0+4" not in cur.held_contributors or "group:t:p0+4" not in owners
    per = {}
    for d in cur.train:
        for who, n in d.users().items():
            per[who] = per.get(who, 0) + n
    assert max(per.values()) <= 0.2 * sum(per.values()) + 1e-9       # the five puppets share one cap


def test_fresh_accounts_neither_train_nor_count():
    now = 1_000_000.0
    rows = rows_of(messages(n_puppets=0), since=now - 48 * 3600) + [
        Row(1000 + k, 99, role, "hello there" if role == "user" else "hi", created_at=1000 + k,
            user="t:new" if role == "user" else None, user_since=now - 3600)
        for k, role in enumerate(["user", "bot"] * 5)]
    cur = curate(rows, after=0, banned=[], max_user_share=1.0, held_out_fraction=0.2, seed=1, common=COMMON,
                 min_account_age_hours=24, now=now)
    users = {r.user for d in cur.train + cur.held_out for r in d.rows if r.user}
    assert "t:new" not in users and cur.dropped["accounts too new"] == 5 and cur.users_before_caps == 8
    off = curate(rows, after=0, banned=[], max_user_share=1.0, held_out_fraction=0.2, seed=1, common=COMMON, now=now)
    assert "t:new" in {r.user for d in off.train + off.held_out for r in d.rows if r.user}


def test_a_gain_that_concentrates_on_a_minority_of_contributors_is_rejected():
    before = {"held_out": 3.0, "base": 3.0, "groups": {"c1": 3.0, "c2": 3.0, "c3": 3.0, "c4": 3.0, "c5": 3.0}}
    narrow = {"held_out": 2.5, "base": 3.0, "groups": {"c1": 1.0, "c2": 3.01, "c3": 3.02, "c4": 2.99, "c5": 3.0}}
    broad = {"held_out": 2.5, "base": 3.0, "groups": {"c1": 2.5, "c2": 2.6, "c3": 2.4, "c4": 2.55, "c5": 2.7}}
    verdict = decide(before, narrow, True, margin=0.01, tolerance=0.1)
    assert verdict.decision is Decision.REJECTED and "concentrate on a minority" in verdict.reason
    assert decide(before, broad, True, margin=0.01, tolerance=0.1).promoted
    few = {"c1": 1.0, "c2": 2.0, "c3": 2.9}        # all improve, but c1 alone is 67% of the gain: allowed at 80%
    assert gain_breadth({"c1": 3.0, "c2": 3.0, "c3": 3.0}, few) is None
    lop = {"c1": 0.5, "c2": 2.95, "c3": 2.95}      # c1 alone is 96% of it
    assert "96%" in gain_breadth({"c1": 3.0, "c2": 3.0, "c3": 3.0}, lop)
    assert gain_breadth({"c1": 3.0}, {"c1": 1.0}) is None      # one contributor: nothing to compare


@pytest.mark.parametrize("puppets", [5, 10])
async def test_sock_puppets_cannot_teach_their_payload(tmp_path, base_model, puppets):
    out = await scenario(tmp_path, str(base_model), puppets=puppets, **FAST, base_loss_tolerance=0.5,
                         min_account_age_hours=24)
    print(f"\n{puppets} puppets: {out['decision']}: payload {out['payload_before']:.4f} → "
          f"{out['payload_after']:.4f}, "
          f"control {out['control_before']:.4f} → {out['control_after']:.4f}\n{out['summary']}")
    # no promotion, or the payload's loss fell no more than that of made-up phrases nobody sent
    # (undefended, with linking off, it falls 0.2-0.25 more than the largest of them: scripts/puppet_sim.py)
    payload_drop = out["payload_before"] - out["payload_after"]
    assert out["decision"] != "promoted" or payload_drop <= max(out["control_drops"]) + 0.01, out
    assert out["data"]["linked_accounts"] == puppets and out["data"]["linked_groups"] == 1
    assert "Linked group 1: " + ", ".join(sorted(f"telegram:puppet{i}" for i in range(puppets))) in out["summary"]
    assert out["data"]["largest_contributor_share"] <= 0.2 + 1e-9


async def test_the_same_honest_users_without_puppets_still_promote(tmp_path, base_model):
    out = await scenario(tmp_path, str(base_model), puppets=0, **FAST, base_loss_tolerance=0.5,
                         min_account_age_hours=24)
    assert out["decision"] == "promoted", out["summary"]
    assert out["data"]["linked_groups"] == 0 and out["data"]["contributors"] == 6
    assert "Last run's contributors: 6 in the training data (6 accounts; 0 accounts linked" in out["status"]


def test_coalition_constants_are_documented():
    doc = coalitions.__doc__
    assert "2+ messages" in doc and "80 %" in doc and "[phrase]" in doc


def test_what_admins_see_about_a_runs_contributors_and_the_config_rules():
    from bots.config import ConfigError, parse_config
    from bots.dashboard.feedback import contributors_html
    from bots.learning.report import contributor_lines

    data = {"contributors": 7, "accounts": 11, "linked_accounts": 5, "linked_groups": 1,
            "link_reasons": {"shared rare phrases": 4}, "largest_contributor_share": 0.2, "held_out_contributors": 2,
            "masked_phrases": 10, "too_new_messages": 3,
            "linked_group_members": [["telegram:p0", "telegram:p1", "telegram:p2", "telegram:p3", "telegram:p4"]]}
    public, admin = contributor_lines(data), contributor_lines(data, members=True)
    assert public[0].startswith("Contributors: 7 in the training data (11 accounts; 5 accounts linked into 1 group(s) "
                                "(shared rare phrases ×4)); the largest supplied 20% of it; 2 other contributor(s)")
    assert "3 messages of accounts too new" in public[0] and len(public) == 1
    assert admin[1] == "Linked group 1: telegram:p0, telegram:p1, telegram:p2, telegram:p3, telegram:p4"
    page = contributors_html([{"id": 4, "data": data}])
    assert "Who taught the last run (#4)" in page and "5 accounts linked" in page and "telegram:p0" not in page
    assert contributor_lines({}) == [] and contributors_html([]) == ""
    for bad in ({"min_account_age_hours": -1}, {"canary_min_raters": 0}):
        with pytest.raises(ConfigError):
            parse_config({"learning": bad})
    lc = parse_config({}).learning
    assert lc.min_account_age_hours == 24 and lc.canary_min_raters == 30
