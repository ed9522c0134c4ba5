"""Canary rollout: the configured share of chats, sticky, never opted-out chats; simulated
users who dislike (or like) the candidate decide whether it is promoted. Real SQLite, real
tiny models in two real engines, the real chat path."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from types import SimpleNamespace

import pytest

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.config import parse_config
from bots.learning.canary import in_canary
from bots.learning.decide import Decision
from bots.learning.report import RunResult, RunStatus
from bots.learning.stats import non_inferiority, sample_size, wilson
from engine.registry import Registry
from engine.serving.protocol import ReplyEngine
from tests.conftest import build_dialogpt_model
from tests.test_learning import base_model  # noqa: F401  (fixture: a tiny model that knows chitchat)

pytestmark = pytest.mark.timeout(120)


def make_config(tmp_path, model, **learning):
    return parse_config({
        "model": {"path": str(model)},
        "storage": {"path": str(tmp_path / "mynah.sqlite3")},
        "generation": {"max_new_tokens": 3, "seed": 1},
        "learning": {"enabled": True, "registry": str(tmp_path / "models"), "schedule": "24h", "base_corpus": "",
                     "poll_seconds": 0.2, "min_account_age_hours": 0, **learning},
    })


def test_assignment_is_the_configured_share_sticky_and_per_candidate():
    chats = range(1, 4001)
    picked = {c for c in chats if in_canary(c, "v0002", 0.1)}
    assert 0.085 <= len(picked) / 4000 <= 0.115
    assert picked == {c for c in chats if in_canary(c, "v0002", 0.1)}          # sticky
    assert picked <= {c for c in chats if in_canary(c, "v0002", 0.3)}           # a larger share keeps them
    assert picked != {c for c in chats if in_canary(c, "v0003", 0.1)}           # each candidate draws anew
    assert not any(in_canary(c, "v0002", 0.0) for c in chats)


def test_statistics_by_hand():
    lo, hi = wilson(81, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.722, 0.875)   # Wilson 95% for 81/100, by hand
    worse = non_inferiority(30, 100, 70, 100, margin=0.05, alpha=0.05)
    better = non_inferiority(70, 100, 50, 100, margin=0.05, alpha=0.05)
    assert not worse.not_worse and worse.p_value > 0.99 and worse.lower < -0.05
    assert better.not_worse and better.p_value < 0.001 and better.lower > -0.05
    same = non_inferiority(50, 100, 50, 100, margin=0.05, alpha=0.05)
    assert not same.not_worse            # 100 a side cannot show "no worse than 5 points"
    assert 1200 <= sample_size(0.5, 0.05) <= 1300


async def _start(tmp_path, tiny_dialogpt, **learning):
    app = await Mynah.open(make_config(tmp_path, tiny_dialogpt, **learning))
    app.learning.canary.check_every_s = 3600   # the test calls check() itself
    candidate = build_dialogpt_model(tmp_path / "candidate", seed=7)
    run_id = await app.store.runs.start_training_run("test")
    run = SimpleNamespace(run_id=run_id, trigger="test", notify_to=[])
    result = RunResult(run_id, RunStatus.DONE, Decision.PROMOTED, "held-out loss fell by 0.1")
    active = app.learning.registry.active()
    await app.learning.canary.begin(run, active, 0, {}, candidate, result)
    assert result.decision == Decision.CANARY, result.reason
    return app, result.data["candidate"], active.name, run_id


MESSAGE_IDS = itertools.count()   # every message a fresh platform id (a repeated one is a redelivery)


async def _talk(app, chats: range, *, opted_out: set[int] = frozenset()) -> dict[int, tuple[str, str]]:
    """One message per chat through the real chat path; {chat: (version, reply platform id)}."""
    async def one(i):
        msg = Incoming("telegram", f"c{i}", f"u{i}", "hello there", message_id=f"m{i}-{next(MESSAGE_IDS)}")
        if i in opted_out:
            await app.chat.handle(Incoming("telegram", f"c{i}", f"u{i}", "/optout"))
        (out,) = await app.chat.handle(msg)
        await app.chat.delivered(out, f"r{i}")
        row = await app.db.fetchone("SELECT model_version FROM messages WHERE id = ?", (out.stored_id,))
        return i, (row[0], f"r{i}")

    got = {}
    for start in range(chats.start, chats.stop, 50):
        got.update(await asyncio.gather(*(one(i) for i in range(start, min(start + 50, chats.stop)))))
    return got


async def test_canary_serves_its_share_of_chats_sticky_and_never_opted_out_ones(tmp_path, tiny_dialogpt):
    app, candidate, active, _ = await _start(tmp_path, tiny_dialogpt, canary_share=0.3)
    try:
        first = await _talk(app, range(200), opted_out={0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
        on_candidate = {i for i, (v, _) in first.items() if v == candidate}
        assert {v for v, _ in first.values()} == {candidate, active}
        assert 0.18 <= len(on_candidate) / 190 <= 0.42                      # ~30% of the opted-in chats
        assert not on_candidate & set(range(10))                             # opted out: never the canary
        chat_ids = {i: await app.store.chats.chat("telegram", f"c{i}") for i in range(10, 200)}
        assert on_candidate == {i for i, cid in chat_ids.items() if in_canary(cid, candidate, 0.3)}
        again = await _talk(app, range(10, 200))
        assert {i for i, (v, _) in again.items() if v == candidate} == on_candidate   # sticky
        assert app.engine.version == active                                  # /status: still the active one
        assert isinstance(app.chat.engine, ReplyEngine)                      # the Router keeps the contract
        lines = "\n".join(await app.learning.status_lines())
        assert f"Canary: {candidate} serves 30% of chats" in lines
        await _dashboard_shows_the_canary(app, candidate)
    finally:
        await app.close()


async def _dashboard_shows_the_canary(app, candidate):
    import aiohttp

    from bots.dashboard import start_dashboard

    token = "canary-dashboard-token-0123456789"
    config = parse_config({**{"dashboard": {"enabled": True, "port": 0}}})
    handle = await start_dashboard(app, config, {"MYNAH_DASHBOARD_TOKEN": token})
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.get(handle.url + "/training") as r:
                page = await r.text()
            async with http.get(handle.url + "/api/training", headers={"Accept": "application/json"}) as r:
                data = await r.json()
        assert f"Canary <strong>{candidate}</strong> serves 30% of chats" in page
        assert "Feedback by version" in page
        assert data["canary"]["candidate"] == candidate and data["canary"]["replies_candidate"] > 0
    finally:
        await handle.stop()


async def _simulate(app, candidate, rates: dict[str, float], chats: int = 300, seed: int = 1):
    """Simulated users: each reacts 👍 with the probability of the version that answered, else 👎."""
    rng = random.Random(seed)
    replies = await _talk(app, range(chats))
    for i, (version, platform_id) in replies.items():
        emoji = "👍" if rng.random() < rates[version] else "👎"
        assert await app.feedback.add_reaction("telegram", f"c{i}", platform_id, f"u{i}", emoji) == 1


@pytest.mark.parametrize("better", [False, True])
async def test_a_clearly_worse_canary_is_retired_and_a_clearly_better_one_promoted(tmp_path, tiny_dialogpt, better):
    app, candidate, active, run_id = await _start(tmp_path, tiny_dialogpt, canary_share=0.4, canary_min_replies=60)
    try:
        canary = app.learning.canary
        await _simulate(app, candidate, {candidate: 0.8 if better else 0.3, active: 0.55})
        numbers = await canary.counts()
        assert numbers.n_c >= 60 and numbers.n_a >= 60
        test = non_inferiority(numbers.k_c, numbers.n_c, numbers.k_a, numbers.n_a, margin=0.05, alpha=0.05)
        print(f"\nsimulated canary ({'better' if better else 'worse'} candidate): {test.text()}")
        assert await canary.check() == ("promoted" if better else "retired")
        registry = Registry(app.config.learning.registry)
        run = await app.store.runs.training_run(run_id)
        served = {v for v, _ in (await _talk(app, range(1000, 1020))).values()}   # every chat: one version now
        if better:
            assert registry.active_name() == candidate and served == {candidate}
            assert run["decision"].startswith(f"promoted {candidate} after its canary: not worse")
        else:
            assert registry.active_name() == active and served == {active}
            assert candidate not in [v.name for v in registry.versions()]       # retired: deleted
            assert run["decision"].startswith("rejected after its canary: worse")
        assert canary.state is None and canary.router.candidate is None
        assert "Last canary:" in "\n".join(await app.learning.status_lines())
    finally:
        await app.close()


async def test_too_few_rated_replies_when_time_is_up_retires_and_a_restart_resumes(tmp_path, tiny_dialogpt):
    app, candidate, active, _ = await _start(tmp_path, tiny_dialogpt, canary_share=0.5, canary_hours=1)
    await app.close()                                         # a restart in the middle of the canary
    app = await Mynah.open(make_config(tmp_path, tiny_dialogpt, canary_share=0.5, canary_hours=1))
    try:
        canary = app.learning.canary
        assert canary.state is not None and canary.router.candidate.version == candidate
        assert await canary.check() is None                   # not over yet, nothing rated
        started = canary.state.started_at
        assert await canary.check(now=started + 3601) == "retired"
        assert "too few rated replies" in canary.last[1]
        assert Registry(app.config.learning.registry).active_name() == active
    finally:
        await app.close()


async def test_a_real_run_that_passes_the_loss_gate_starts_a_canary_and_feedback_promotes_it(tmp_path, base_model):
    """The learning loop's hook: a trainer run that would have promoted starts a canary instead."""
    from tests.test_learning import CATCHPHRASE, Inbox, admin_msg, log_chats
    from tests.test_learning import make_config as learning_config

    config = learning_config(tmp_path, base_model, base_loss_tolerance=0.5, canary_share=0.5, canary_min_replies=8,
                             canary_min_raters=8)
    app = await Mynah.open(config)
    try:
        learning, inbox = app.learning, Inbox()
        learning.canary.check_every_s = 3600
        learning.add_notifier("telegram", inbox)
        await log_chats(app.store, 24, CATCHPHRASE)
        await app.chat.handle(admin_msg("/retrain"))
        result = await learning.wait()
        assert result.decision == Decision.CANARY, result.summary()
        assert learning.registry.active_name() == "v0001" and learning.canary.state.candidate == "v0002"
        run = await app.store.runs.training_run(result.run_id)
        assert run["decision"] == "canary" and "serves 50% of chats" in inbox.got[0][1].text
        await _simulate(app, "v0002", {"v0002": 0.95, "v0001": 0.2}, chats=60)
        assert await learning.canary.check() == "promoted"
        assert learning.registry.active_name() == "v0002"
        run = await app.store.runs.training_run(result.run_id)
        assert run["decision"].startswith("promoted v0002 after its canary")
        assert "promoted, now serving it" in inbox.got[-1][1].text and "z = " in inbox.got[-1][1].text
    finally:
        await app.close()


async def test_a_canary_started_by_mynah_retrain_is_picked_up_by_the_running_bot(tmp_path, base_model):
    from scripts.retrain import retrain
    from tests.test_learning import CATCHPHRASE, log_chats
    from tests.test_learning import make_config as learning_config

    config = learning_config(tmp_path, base_model, base_loss_tolerance=0.5, canary_share=0.5)
    app = await Mynah.open(config)
    try:
        app.learning.canary.check_every_s = 3600
        await log_chats(app.store, 24, CATCHPHRASE)
        status, result = await retrain(config, force=True, quiet=True)      # another "process": the CLI
        assert status == 0 and result.decision == Decision.CANARY, result.summary()
        canary = app.learning.canary
        assert canary.state is None and canary.router.candidate is None
        assert await canary.check() is None                                # picked up, not due yet
        assert canary.state.candidate == "v0002" and canary.router.candidate.version == "v0002"
        assert Registry(config.learning.registry).active_name() == "v0001"
    finally:
        await app.close()


async def test_with_two_workers_both_serve_the_canary_and_one_judges_it(tmp_path, tiny_dialogpt, pg_url):
    """Two workers on one database and registry: the canary begun by one is served by both;
    when both check at once one decides, and the other lets the ended canary go instead of
    ending it again (it used to retire, i.e. delete, the version the first had promoted)."""
    learning = {"canary_share": 0.4, "canary_min_replies": 60}
    config = dataclasses.replace(make_config(tmp_path, tiny_dialogpt, **learning),
                                 storage=parse_config({"storage": {"url": pg_url}}).storage)
    first = await Mynah.open(config)
    second = None
    try:
        first.learning.canary.check_every_s = 3600
        candidate_folder = build_dialogpt_model(tmp_path / "candidate", seed=7)
        run_id = await first.store.runs.start_training_run("test")
        result = RunResult(run_id, RunStatus.DONE, Decision.PROMOTED, "held-out loss fell by 0.1")
        active = first.learning.registry.active()
        await first.learning.canary.begin(SimpleNamespace(run_id=run_id, trigger="test", notify_to=[]), active, 0,
                                          {}, candidate_folder, result)
        candidate = result.data["candidate"]
        second = await Mynah.open(config)
        second.learning.canary.check_every_s = 3600
        assert second.learning.canary.router.candidate.version == candidate        # served on both
        await _simulate(first, candidate, {candidate: 0.8, active.name: 0.55})
        outcomes = await asyncio.gather(first.learning.canary.check(), second.learning.canary.check())
        assert sorted(map(str, outcomes)) == ["None", "promoted"], outcomes       # one judge
        for app in (first, second):
            assert await app.learning.canary.check() is None
            assert app.learning.canary.state is None and app.learning.canary.router.candidate is None
        registry = Registry(config.learning.registry)
        assert registry.active_name() == candidate and candidate in [v.name for v in registry.versions()]
        assert (await first.store.runs.training_run(run_id))["decision"].startswith(f"promoted {candidate}")
    finally:
        if second is not None:
            await second.close()
        await first.close()
