"""Learning you can trust, end to end with real trainer runs on a tiny model: the Tay
scenario never promotes, and /forget after a promotion reaches the model.
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from bots.app import Mynah
from bots.chat.events import Incoming
from bots.learning.decide import Decision
from bots.learning.report import RunStatus
from storage.trust import TrustStore
from tests.test_learning import ADMIN, CATCHPHRASE, base_model, log_chats, make_config  # noqa: F401 (fixture)

ADVERT_WORDS = "cheap watches pills crypto coins deals bargains shoes phones bags loans tickets".split()


def advert(rng: random.Random, k: int) -> str:
    """One of the attacker's 200 paced messages: the advert, worded a little differently each time."""
    a, b, c = rng.sample(ADVERT_WORDS, 3)
    return f"visit megashop for {a} , {b} and {c} , offer {k} , megashop is the best"


def user_msg(text: str, user: str, chat: str | None = None) -> Incoming:
    return Incoming(platform="telegram", chat_id=chat or user, user_id=user, text=text, user_name=f"u{user}")


async def test_tay_one_user_with_a_few_others_never_promotes_and_says_why(tmp_path, base_model):
    """200 paced messages from one user, /reset every 10, plus a few other users: the scheduled
    run (its threshold met) and an admin's /retrain both end without a promotion, and say why."""
    config = make_config(tmp_path, base_model, min_new_messages=200, min_users=5, max_user_share=0.2)
    async with await Mynah.open(config) as app:
        conv, rng = app.store, random.Random(7)
        chat = await conv.chats.chat("telegram", "evil")
        evil = await conv.chats.user("telegram", "evil")
        for k in range(200):
            await conv.messages.log_message(chat, "user", advert(rng, k), user_id=evil)
            await conv.messages.log_message(chat, "bot", "hmm , ok")
            if k % 10 == 9:
                await conv.messages.reset(chat)
        await log_chats(conv, 3, "nice to meet you", prefix="friend")
        learning = app.learning
        new, _ = await learning.runs.new_messages()
        assert new >= config.learning.min_new_messages       # the threshold alone would start a run
        result = await learning.run_once("scheduled")
        assert result is not None and result.status == RunStatus.SKIPPED and result.decision == Decision.SKIPPED
        assert "min_users = 5" in result.reason and "(4 sent new messages" in result.reason
        assert result.data["largest_user_messages"] <= 0.2 * result.data["train_user_messages"]
        # an admin's /retrain obeys the same rules (it only skips the min_new_messages threshold)
        await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/retrain"))
        forced = await learning.wait()
        assert forced.status == RunStatus.SKIPPED and "min_users" in forced.reason
        assert learning.registry.active_name() == "v0001" and len(learning.registry.versions()) == 1
        runs = await conv.runs.training_runs(5)
        assert len(runs) == 2 and all(r["decision"].startswith("skipped: only 0 distinct user") for r in runs)


PET = ["my pet is a purple dragon named zorblax", "zorblax the purple dragon sleeps on my bed",
       "every morning zorblax the purple dragon eats toast", "i walk zorblax the purple dragon in the park",
       "zorblax my purple dragon likes jazz music", "have you met zorblax , my purple dragon ?",
       "zorblax the purple dragon can fly over the city", "my friends are afraid of zorblax the purple dragon",
       "zorblax the purple dragon has green eyes", "at night zorblax the purple dragon sings"]
# The user's own rare phrase ("zorblax the purple dragon") is masked before training (only one
# contributor uses it: coalitions.py); what the model still learns from their dialogues is the
# conversation around it, the bot's answers included, and that is what /forget must take back.
REPLY = "what a lovely dragon , i would love to meet it one day"
# the user's own dialogues, and unseen ones of the same shape: how much of the learning was theirs
PHRASE = [[text, REPLY] for text in PET]
CONTROL = [["my pet is a small brown dog named rex", "what a lovely dog"],
           ["rex the brown dog sleeps on the sofa", "what a lovely dog"],
           ["every evening rex the small dog eats rice", "what a lovely dog"],
           ["i take rex the brown dog to the beach", "what a lovely dog"]]


def phrase_loss(path: str) -> float:
    """The user's phrase's loss, less an unseen control's (what the model learned in general cancels out)."""
    from engine.model import load_model
    from engine.training.train import evaluate_loss

    loaded = load_model(path)
    own = evaluate_loss(loaded.model, loaded.fmt, PHRASE, batch_size=4, max_len=64)
    return own - evaluate_loss(loaded.model, loaded.fmt, CONTROL, batch_size=4, max_len=64)


async def test_forget_after_a_promotion_reaches_the_model(tmp_path, base_model, capsys):
    config = make_config(tmp_path, base_model, base_loss_tolerance=0.5, rebuild_delay_seconds=0, epochs=3)
    async with await Mynah.open(config) as app:
        conv, learning = app.store, app.learning
        await log_chats(conv, 24, CATCHPHRASE)
        chat, user = await conv.chats.chat("telegram", "pet"), await conv.chats.user("telegram", "pet")
        for text in PET:
            await conv.messages.log_message(chat, "user", text, user_id=user)
            await conv.messages.log_message(chat, "bot", REPLY)
        mine = {r[0] for r in await app.db.fetchall("SELECT id FROM messages WHERE user_id = ?", (user,))}
        result = await learning.run_once("test", force=True)
        assert result.decision == Decision.PROMOTED, result.summary()
        trust = TrustStore(app.db)
        assert await trust.versions_trained_on("telegram", "pet") == {"v0002"}
        assert mine & await trust.trained_message_ids("v0002")
        base, learned = phrase_loss(str(base_model)), phrase_loss(str(learning.registry.get("v0002").folder))
        print("phrase loss (less control): base", base, "v0002", learned)
        assert learned < base - 0.05, (base, learned)     # v0002 did learn the user's phrase

        asked = time.monotonic()
        out = await app.chat.handle(Incoming(platform="telegram", chat_id="pet", user_id="pet", text="/forget"))
        text = out[0].text
        assert f"deleted {len(PET)} of your messages" in text and "now serve v0001" in text and "rebuild" in text
        assert app.engine.version == "v0001" and time.monotonic() - asked < 60
        assert learning.registry.active_name() == "v0001"
        assert "v0002" not in [v.name for v in learning.registry.versions()]       # its folder is gone
        assert set(await trust.tainted()) == {"v0002"}
        reply = await app.chat.handle(user_msg("hello there", "someone"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0001"

        # the queued rebuild: a normal run from v0001 on what remains
        for _ in range(200):
            runs = await conv.runs.training_runs(1)
            if runs and runs[0]["trigger"] == "rebuild after /forget" and runs[0]["status"] != "running":
                break
            await asyncio.sleep(0.2)
        rebuilt = await learning.wait()
        assert rebuilt is not None and rebuilt.base_version == "v0001", rebuilt
        served = learning.registry.active()
        assert served.name != "v0002" and served.name not in await trust.tainted()
        if rebuilt.promoted:
            assert served.name == rebuilt.promoted and served.parent == "v0001"
            assert not mine & await trust.trained_message_ids(served.name)
            assert "pet" not in {u for v in [served.name] for u in await _users(app.db, v)}
        now = phrase_loss(served.model_path if served.kind == "configured" else str(served.folder))
        print("phrase loss (less control): served", served.name, now)
        assert now > learned + 0.6 * (base - learned), (base, learned, now)   # back near the base model's
        # /models shows lineage and taint
        models = (await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN,
                                                 text="/models")))[0].text
        assert "Retired and deleted after /forget (tainted): v0002" in models
        # and no admin can serve it again
        back = (await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN,
                                               text="/rollback v0002")))[0].text
        assert "forgotten data" in back and learning.registry.active_name() == served.name
        # `mynah models --json`: active, each version's name and parent, lineage and taint
        from scripts.cli import main

        toml = tmp_path / "config.toml"
        toml.write_text(f'[model]\npath = "{base_model}"\n[storage]\npath = "{config.storage.path}"\n'
                        f'[learning]\nregistry = "{config.learning.registry}"\n', encoding="utf-8")
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["--config", str(toml), "models", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert listed["active"] == served.name and set(listed["tainted"]) == {"v0002"}
        by_name = {v["version"]: v for v in listed["versions"]}
        assert by_name["v0001"]["parent"] == "" and by_name["v0001"]["tainted"] is None
        if rebuilt.promoted:
            assert by_name[served.name]["parent"] == "v0001" and by_name[served.name]["lineage"]["users"] >= 5


async def test_require_approval_waits_for_promote(tmp_path, base_model):
    """A passing candidate is installed but not served; the admin gets numbers and sample
    replies; /promote serves it (and a non-admin cannot)."""
    config = make_config(tmp_path, base_model, base_loss_tolerance=0.5, require_approval=True)
    async with await Mynah.open(config) as app:
        learning = app.learning
        got = []

        async def inbox(chat_id, out, **_):
            got.append(out.text)

        learning.add_notifier("telegram", inbox)
        await log_chats(app.store, 24, CATCHPHRASE)
        await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/retrain"))
        result = await learning.wait()
        assert result.decision == Decision.REJECTED and result.reason == "awaiting approval: /promote v0002"
        assert learning.registry.active_name() == "v0001" and app.engine.version == "v0001"
        note = next(t for t in got if "waits for your approval" in t)
        assert "/promote v0002" in note and "Held-out loss" in note and "hello there →" in note
        models = (await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN,
                                                 text="/models")))[0].text
        assert "awaiting approval (/promote v0002)" in models and "trained on" in models
        refused = await app.chat.handle(Incoming(platform="telegram", chat_id="b", user_id="7", text="/promote v0002"))
        assert "admins only" in refused[0].text and learning.registry.active_name() == "v0001"
        out = await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/promote v0002"))
        assert "now serving v0002" in out[0].text      # said only once the worker serves it
        assert learning.registry.active_name() == "v0002" and app.engine.version == "v0002"
        assert await _replier(app) == "v0002"
        back = await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/rollback v0001"))
        assert "now serving v0001" in back[0].text and app.engine.version == "v0001"
        assert await _replier(app) == "v0001"
        await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/rollback v0002"))
        again = await app.chat.handle(Incoming(platform="telegram", chat_id="a", user_id=ADMIN, text="/promote v0001"))
        assert "not waiting for approval" in again[0].text


async def _replier(app) -> str:
    """The model version that wrote the next reply."""
    reply = await app.chat.handle(Incoming(platform="telegram", chat_id="someone", user_id="77", text="hello there"))
    rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
    return rows[0][0]


async def _users(db, version: str) -> set[str]:
    rows = await db.fetchall("SELECT platform_user_id FROM version_users WHERE version = ?", (version,))
    return {r[0] for r in rows}
