"""The learning loop end to end: real SQLite, real tiny models, real trainer processes.

The configured model is a tiny GPT-2 trained for a few seconds on the chitchat corpus, so
"forgetting" the base corpus is measurable. Each trainer run takes a few seconds.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import string
import time
from pathlib import Path

import pytest

from bots.app import Mynah
from bots.config import parse_config
from bots.chat.events import Incoming, Outgoing
from bots.learning.decide import Decision, decide
from bots.learning.export import BaseCorpus, changed_since_export, export_dialogues
from bots.learning.loop import Learning
from bots.learning.schedule import ScheduleState
from engine.training.finetune import read_data
from engine.training import events
from engine.training.events import Train
from engine.registry import FileLock, Registry, RegistryError, clean_stale, parse_version
from storage.store import Store
from storage.db import Database
from tests.conftest import build_dialogpt_model

ADMIN = "42"
CATCHPHRASE = "indubitably , my good friend , indubitably !"
QUESTIONS = ["hello there", "how are you ?", "what do you like to do ?", "do you have a dog ?",
             "where do you live ?", "what is your name ?", "good morning", "see you later"]

# Small and quick: every run trains for a few seconds on one thread.
FAST = dict(schedule="24h", base_eval_dialogues=20, epochs=2, lr=3e-3, max_len=64, batch_size=8,
            min_free_disk_mb=1, poll_seconds=0.2, threads=1, nice=5, min_new_messages=1, min_account_age_hours=0)


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 that has seen some of the chitchat corpus (its base loss means something)."""
    from engine.training.data import read_corpus
    from engine.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("learning-base")
    init = build_dialogpt_model(root / "init", n_layer=1)
    dialogues = list(read_corpus("chitchat"))[:300]
    train(TrainConfig(output=str(root / "model"), init=str(init), dialogues=dialogues, max_len=64, lr=3e-3,
                      max_steps=120, batch_size=16, eval_every=120, threads=1, progress=False, valid_fraction=0.1))
    return root / "model"


def make_config(tmp_path: Path, model: Path, **learning):
    return parse_config({
        "model": {"path": str(model)},
        "storage": {"path": str(tmp_path / "mynah.sqlite3")},
        "generation": {"max_new_tokens": 6, "seed": 1},
        "admins": {"telegram": [ADMIN]},
        "learning": {"enabled": True, "registry": str(tmp_path / "models"), **{**FAST, **learning}},
    })


async def log_chats(conv: Store, n: int, bot_line, *, platform="telegram", prefix="u", seed=0) -> list[int]:
    """n chats of three user/bot exchanges each; returns the chat ids."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        chat = await conv.chats.chat(platform, f"{prefix}{i}")
        user = await conv.chats.user(platform, f"{prefix}{i}")
        for _ in range(3):
            await conv.messages.log_message(chat, "user", rng.choice(QUESTIONS), user_id=user)
            await conv.messages.log_message(chat, "bot", bot_line(rng) if callable(bot_line) else bot_line)
        chats.append(chat)
    return chats


def noise(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation) for _ in range(40))


def admin_msg(text: str, user: str = ADMIN, chat: str = "admin-chat") -> Incoming:
    return Incoming(platform="telegram", chat_id=chat, user_id=user, text=text, user_name="boss")


class Inbox:
    """A notifier as an adapter would register it."""

    def __init__(self):
        self.got: list[tuple[str, Outgoing]] = []

    async def __call__(self, chat_id: str, out: Outgoing) -> None:
        self.got.append((chat_id, out))


def registry_is_consistent(root: Path) -> None:
    """Every vNNNN folder is complete, the pointer names one of them, nothing half-written."""
    registry = Registry(root)
    names = [v.name for v in registry.versions()]
    assert registry.active_name() in names
    leftovers = [p.name for p in root.iterdir() if p.name.startswith((".v", ".trash"))]
    assert leftovers == []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("v"):
            assert (p / "version.json").is_file()
    for run in (root / "runs").glob("run-*"):
        assert not (run / "data.jsonl").exists() and not list(run.glob("candidate*")), run


# --------------------------------------------------------------------------- the main path

async def test_retrain_learns_a_new_style_promotes_and_replies_carry_the_new_version(tmp_path, base_model):
    config = make_config(tmp_path, base_model, base_loss_tolerance=0.5)
    app = await Mynah.open(config)
    try:
        learning = app.learning
        assert app.engine.version == "v0001" and learning.registry.active().kind == "configured"
        inbox = Inbox()
        learning.add_notifier("telegram", inbox)
        await log_chats(app.store, 24, CATCHPHRASE)

        started = await app.chat.handle(admin_msg("/retrain"))
        assert "run #1" in started[0].text
        busy = await app.chat.handle(admin_msg("/retrain"))
        assert "already running" in busy[0].text
        status = "\n".join(o.text for o in await app.chat.handle(admin_msg("/status")))
        assert "Running now: run #1" in status

        result = await learning.wait()
        assert result.decision == "promoted", result.summary()
        before, after = result.losses["before"], result.losses["after"]
        assert after["held_out"] < before["held_out"] - config.learning.promote_margin
        assert result.data["held_out"] >= 1 and result.data["train_new"] >= 1 and result.data["replay_base"] >= 1

        # the admin who asked got the numbers and the picture, in the chat where they asked
        (chat_id, note), = inbox.got
        assert chat_id == "admin-chat" and "promoted" in note.text and "Held-out loss" in note.text
        assert note.image is not None and note.image.is_file() and note.image.read_bytes()[:4] == b"\x89PNG"

        # the registry, the record, and what is served
        assert learning.registry.active_name() == "v0002"
        v2 = learning.registry.get("v0002")
        assert v2.parent == "v0001" and v2.run_id == 1 and (v2.folder / "model.safetensors").is_file()
        assert v2.metrics["held_out_loss"] == pytest.approx(after["held_out"])
        run = await app.store.runs.training_run(1)
        assert run["status"] == "done" and run["decision"].startswith("promoted v0002")
        assert run["trigger"] == f"telegram:{ADMIN} (boss)" and run["duration_s"] > 0
        assert run["losses"]["after"]["held_out"] == pytest.approx(after["held_out"])
        assert run["data"]["through"] >= run["data"]["new_dialogues"]
        registry_is_consistent(tmp_path / "models")

        reply = await app.chat.handle(Incoming(platform="telegram", chat_id="someone", user_id="7", text="hello there"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0002"

        status = "\n".join(o.text for o in await app.chat.handle(admin_msg("/status")))
        assert "Active version: v0002, held-out loss" in status and "Next scheduled run" in status
        assert "#1" in status and "promoted v0002" in status
        models = (await app.chat.handle(admin_msg("/models")))[0].text
        assert "* v0002" in models and "fine-tuned from v0001 by run #1" in models

        # /rollback switches back at once; a reply after it is written by v0001
        back = (await app.chat.handle(admin_msg("/rollback")))[0].text
        assert "now serving v0001 (was v0002)" in back
        reply = await app.chat.handle(Incoming(platform="telegram", chat_id="someone", user_id="7", text="and now ?"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0001" and learning.registry.active_name() == "v0001"
        forward = (await app.chat.handle(admin_msg("/rollback 2")))[0].text
        assert "now serving v0002" in forward
    finally:
        await app.close()


async def test_candidate_trained_on_noise_is_rejected(tmp_path, base_model):
    config = make_config(tmp_path, base_model, base_replay_fraction=0.0, replay_fraction=0.0, epochs=3)
    registry = Registry(config.learning.registry)
    registry.ensure_configured(str(base_model))
    db = await Database.open(config.storage.path)
    try:
        conv = Store.over(db)
        learning = Learning(config, registry, conv)
        await learning.start(schedule=False)
        await log_chats(conv, 24, noise)
        result = await learning.run_once("test", force=True)
        assert result.decision == "rejected", result.summary()
        assert "base-corpus loss rose" in result.reason
        assert result.losses["after"]["base"] > result.losses["before"]["base"] + config.learning.base_loss_tolerance
        assert registry.active_name() == "v0001" and [v.name for v in registry.versions()] == ["v0001"]
        run = await conv.runs.training_run(result.run_id)
        assert run["status"] == "done" and run["decision"].startswith("rejected: base-corpus loss rose")
        assert (registry.runs_dir() / "run-0001" / "loss_curve.png").is_file()   # kept for the admin
        registry_is_consistent(registry.root)
        await learning.stop()
    finally:
        await db.close()


def test_decide_never_promotes_nan_and_needs_the_margin():
    nan = float("nan")

    def judge(before: dict, after: dict, finite: bool = True):
        return decide(before, after, finite, margin=0.05, tolerance=0.1)

    def rejected(verdict) -> str:
        assert verdict.decision is Decision.REJECTED and not verdict.promoted
        return verdict.reason

    assert "NaN" in rejected(judge({"held_out": 3.0, "base": 4.0}, {"held_out": nan, "base": 4.0}))
    assert "NaN" in rejected(judge({"held_out": 3.0, "base": 4.0}, {"held_out": 2.0, "base": 4.0}, finite=False))
    assert "NaN" in rejected(judge({"held_out": 3.0, "base": 4.0}, {"held_out": 2.0, "base": nan}))
    assert "margin" in rejected(judge({"held_out": 3.0, "base": 4.0}, {"held_out": 2.96, "base": 4.0}))
    assert "tolerance" in rejected(judge({"held_out": 3.0, "base": 4.0}, {"held_out": 2.0, "base": 4.2}))
    ok = judge({"held_out": 3.0, "base": 4.0}, {"held_out": 2.9, "base": 4.05})
    assert ok.decision is Decision.PROMOTED and ok.decision == "promoted" and "fell by 0.1000" in ok.reason
    assert judge({"held_out": 3.0, "base": None}, {"held_out": 2.9, "base": None}).promoted


def test_every_trainer_event_crosses_the_process_boundary_unchanged():
    """Each record, written as the child writes it, reads back as the same record (Train has a
    `kind` field of its own, which once overwrote the record's tag and was read back as None)."""
    records = [events.Started(41, run_id=3), events.Stage("training", run_id=3),
               events.Data(train=10, held_out=2, base_eval=2, dropped_forgotten=1),
               events.Scored("after", held_out=2.5, base=3.0), Train("step", step=4, total_steps=9, lr=1e-3, run_id=3),
               events.Finished(ok=True, before={"held_out": 3.0}, probes={"p": ["a"]}),
               events.RunEnded("done", "promoted", "fell", run_id=3)]
    assert {type(r) for r in records} == set(events.KINDS.values())
    for record in records:
        assert events.read_event(events.to_json(record)) == record
    assert events.read_event("step 4 of 9") is None and events.read_event('{"record": "nope"}') is None


# --------------------------------------------------------------------------- failures

def test_killed_trainer_leaves_everything_consistent_then_cli_retrain_works(tmp_path, base_model, capsys):
    from scripts.cli import main

    config = make_config(tmp_path, base_model, epochs=200, base_loss_tolerance=0.5)
    toml = tmp_path / "config.toml"
    toml.write_text(
        f'[model]\npath = "{base_model}"\n[storage]\npath = "{tmp_path / "mynah.sqlite3"}"\n[learning]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**FAST, "registry": str(tmp_path / "models"),
                                                         "base_loss_tolerance": 0.5}.items()),
        encoding="utf-8")

    async def start_and_kill():
        registry = Registry(config.learning.registry)
        registry.ensure_configured(str(base_model))
        db = await Database.open(config.storage.path)
        conv = Store.over(db)
        learning = Learning(config, registry, conv)
        await learning.start(schedule=False)
        await log_chats(conv, 24, CATCHPHRASE)
        training = asyncio.Event()
        learning.add_progress_listener(lambda e: isinstance(e, Train) and e.kind == "step" and training.set())
        run_id = await learning.start_run("test")
        await asyncio.wait_for(training.wait(), 120)
        assert registry.train_lock().holder()["run_id"] == run_id
        os.kill(learning.running.pid, signal.SIGKILL)  # the trainer dies mid-training
        result = await learning.wait()
        assert result.status == "failed" and "killed by SIGKILL" in result.reason
        row = await conv.runs.training_run(run_id)
        assert row["status"] == "failed" and "SIGKILL" in row["error"] and row["finished_at"]
        assert registry.active_name() == "v0001" and [v.name for v in registry.versions()] == ["v0001"]
        assert registry.train_lock().holder() is None  # the lock is free again
        registry_is_consistent(registry.root)
        await learning.stop()
        await db.close()

    asyncio.run(start_and_kill())

    # the next run (the operator's CLI twin) works and promotes
    assert main(["--config", str(toml), "retrain"]) == 0
    out = capsys.readouterr().out
    assert "active model: held-out loss" in out and "candidate: held-out loss" in out
    assert "promoted, now serving v0002" in out and "loss curve:" in out
    assert Registry(tmp_path / "models").active_name() == "v0002"
    registry_is_consistent(tmp_path / "models")

    assert main(["--config", str(toml), "models"]) == 0
    out = capsys.readouterr().out
    assert "* v0002" in out and "v0001" in out and "#1" in out and "failed" in out and "#2" in out
    assert main(["--config", str(toml), "rollback"]) == 0
    assert "active: v0001 (was v0002)" in capsys.readouterr().out
    assert main(["--config", str(toml), "rollback", "v9"]) == 1
    assert main(["--config", str(toml), "retrain"]) == 3  # v0001's last attempt (run #2) used everything
    assert "nothing to do: skipped: 0 new user messages" in capsys.readouterr().out


async def test_full_disk_and_out_of_memory_end_in_failed_runs(tmp_path, base_model):
    config = make_config(tmp_path, base_model, min_free_disk_mb=10**9)
    registry = Registry(config.learning.registry)
    registry.ensure_configured(str(base_model))
    db = await Database.open(config.storage.path)
    try:
        conv = Store.over(db)
        await log_chats(conv, 8, CATCHPHRASE)       # 2 of them are the held-out yardstick, 6 train (min_users 5)
        learning = Learning(config, registry, conv)
        result = await learning.run_once("test", force=True)
        assert result.status == "failed" and result.reason.startswith("disk full")

        config.learning.min_free_disk_mb = 1
        config.learning.max_memory_mb = 50
        result = await learning.run_once("test", force=True)
        assert result.status == "failed" and "out of memory" in result.reason, result.reason
        rows = await conv.runs.training_runs()
        assert [r["status"] for r in rows] == ["failed", "failed"]
        assert registry.active_name() == "v0001" and registry.train_lock().holder() is None
        registry_is_consistent(registry.root)
    finally:
        await db.close()


# --------------------------------------------------------------------------- the schedule

async def test_schedule_fires_on_its_interval_and_skips_when_too_little_is_new(tmp_path, base_model):
    config = make_config(tmp_path, base_model, schedule="1s", min_new_messages=50, min_users=1, max_user_share=1.0)
    registry = Registry(config.learning.registry)
    registry.ensure_configured(str(base_model))
    db = await Database.open(config.storage.path)
    learning = Learning(config, registry, Store.over(db))
    try:
        await log_chats(learning.store, 2, CATCHPHRASE)   # 6 user messages: too few
        await learning.start()
        job = learning.schedule.scheduler.get_job("mynah-retrain")
        assert job.coalesce and job.max_instances == 1 and job.misfire_grace_time == 3600
        deadline = time.monotonic() + 15
        while learning.schedule.fires < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert learning.schedule.fires >= 2
        assert learning.schedule.last_check[1] == "skipped: 6 new user messages, 50 needed"
        assert await learning.store.runs.training_runs() == []
        lines = await learning.status_lines()
        assert any(line.startswith("Next scheduled run: ") for line in lines)
        assert any("skipped: 6 new user messages" in line for line in lines)

        # enough new: the next tick starts a run (stopping the bot then interrupts it cleanly)
        learning.lc.min_new_messages = 5
        deadline = time.monotonic() + 15
        while learning.running is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert learning.running is not None and learning.running.trigger == "schedule"
        await learning.stop()
        run, = await learning.store.runs.training_runs()
        assert run["trigger"] == "schedule" and run["status"] == "interrupted"
        assert registry.train_lock().holder() is None
        registry_is_consistent(registry.root)
    finally:
        await learning.stop()
        await db.close()


async def test_an_overdue_interval_catches_up_after_a_restart(tmp_path):
    config = make_config(tmp_path, tmp_path, schedule="24h")
    registry = Registry(config.learning.registry)
    db = await Database.open(config.storage.path)
    try:
        learning = Learning(config, registry, Store.over(db))
        await learning.start()                                  # first start: a whole interval from now
        assert learning.schedule.next_run_time().timestamp() == pytest.approx(time.time() + 86400, abs=5)
        await learning.stop()
        ScheduleState(registry.root).save(time.time() - 3 * 86400)  # the bot was down when it was due
        learning = Learning(config, registry, Store.over(db))
        await learning.start()
        assert learning.schedule.next_run_time().timestamp() == pytest.approx(time.time() + 60, abs=5)
        await learning.stop()
    finally:
        await db.close()


# --------------------------------------------------------------------------- admin and privacy

async def test_admin_commands_refuse_non_admins_and_are_audited(tmp_path, base_model):
    app = await Mynah.open(make_config(tmp_path, base_model))
    try:
        for command in ("/retrain", "/rollback", "/models", "/status"):
            out = await app.chat.handle(admin_msg(command, user="999"))
            assert "admins only" in out[0].text
        assert await app.store.runs.training_runs() == []
        audit = await app.store.audit.recent()
        assert [(a["command"], a["allowed"]) for a in audit][-1] == ("retrain", False)
        out = await app.chat.handle(admin_msg("/rollback"))  # allowed, but nothing to go back to
        assert "no previous version" in out[0].text
    finally:
        await app.close()


async def test_opted_out_and_forgotten_messages_never_reach_training(tmp_path):
    config = make_config(tmp_path, tmp_path, base_corpus="", min_users=1, max_user_share=1.0)
    registry = Registry(config.learning.registry)
    registry.register_configured("starter")
    db = await Database.open(config.storage.path)
    try:
        conv = Store.over(db)
        await log_chats(conv, 3, "public reply", prefix="ok")
        (private,) = await log_chats(conv, 1, "SECRET-OPTOUT", prefix="out")
        await conv.chats.set_consent(private, False)
        await log_chats(conv, 1, "SECRET-FORGOTTEN", prefix="gone")
        await conv.messages.forget_user("telegram", "gone0")
        late = await log_chats(conv, 2, "LATE-CHAT", prefix="late")
        learning = Learning(config, registry, conv)

        async def export(run_id):
            folder = registry.runs_dir() / f"run-{run_id:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            plan = await export_dialogues(conv, config.learning, registry.active(), run_id, folder, BaseCorpus())
            return plan, folder / "data.jsonl"

        plan, data = await export(1)
        assert not plan.skip, plan.skip
        text = data.read_text(encoding="utf-8")
        assert "public reply" in text and "LATE-CHAT" in text
        assert "SECRET-OPTOUT" not in text and "SECRET-FORGOTTEN" not in text
        assert not plan.skip and private not in plan.chats and late[0] in plan.chats

        # a /forget after the export: the trainer drops those dialogues at use time, the
        # finished candidate is vetoed, and the next export no longer has them
        await conv.messages.forget_user("telegram", "late0")
        forgotten = await conv.messages.forgotten_message_ids()
        splits, dropped = read_data(data, forgotten)
        assert dropped == 1 and "LATE-CHAT" in json.dumps(splits)  # late1 did not ask
        assert "/forget" in await changed_since_export(conv, plan)
        await conv.chats.set_consent(late[1], False)
        plan2, data2 = await export(2)
        assert "LATE-CHAT" not in data2.read_text(encoding="utf-8")
        assert "/optout" in await changed_since_export(conv, dataclasses.replace(plan2, ids=set(), chats=plan.chats))
        assert await changed_since_export(conv, plan2) is None   # what is exported now is all still allowed
        # stale export files from a crashed run are deleted on the next start
        await learning.runs.recover()
        assert not data.exists() and not data2.exists()
    finally:
        await db.close()


# --------------------------------------------------------------------------- the registry

def test_registry_versions_pointer_and_config_changes(tmp_path):
    a, b = build_dialogpt_model(tmp_path / "a", n_layer=1), build_dialogpt_model(tmp_path / "b", n_layer=1, seed=1)
    registry = Registry(tmp_path / "models")
    (tmp_path / "models" / "mine").mkdir(parents=True)         # a user's own folder is left alone
    assert registry.ensure_configured(str(a))[0].name == "v0001"
    assert registry.ensure_configured(str(a)) == (registry.get("v0001"), False)
    v2, changed = registry.ensure_configured(str(b))          # [model] path edited: a new version, active
    assert changed and v2.name == "v0002" and v2.kind == "configured" and "changed" in v2.note
    assert registry.active_name() == "v0002" and registry.previous() == "v0001"
    assert registry.ensure_configured(str(b))[1] is False

    # a half-written version (no version.json, or a temp name) is never listed
    (tmp_path / "models" / ".v0003.tmp-999999").mkdir()
    (tmp_path / "models" / "v0009").mkdir()
    assert [v.name for v in registry.versions()] == ["v0001", "v0002"]
    assert clean_stale(registry) == [".v0003.tmp-999999"]
    with pytest.raises(RegistryError, match="no version v0007"):
        registry.set_active("7")

    # rollback steps back through the history; a removed version's number is never reused
    assert registry.rollback()[0].name == "v0001" and registry.previous() is None
    registry.set_active("v0002")
    pointer = json.loads((tmp_path / "models" / "active").read_text())
    assert pointer["version"] == "v0002" and pointer["history"][-1] == "v0002"
    with pytest.raises(RegistryError, match="active"):
        registry.remove("v0002")
    v10 = registry.register_configured("starter", activate=False)
    assert v10.name == "v0010"          # after v0009 (even an incomplete folder's number is taken)
    registry.remove("v0010")
    assert registry.register_configured("starter", activate=False).name == "v0011"
    assert parse_version("3") == parse_version("v3") == "v0003"


def test_train_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    import subprocess
    import sys

    lock = FileLock(tmp_path / ".train.lock")
    assert lock.acquire({"pid": os.getpid(), "run_id": 5})
    assert not FileLock(tmp_path / ".train.lock").acquire()
    assert FileLock(tmp_path / ".train.lock").holder()["run_id"] == 5
    lock.release()
    # a process that dies holding the lock (SIGKILL: no cleanup at all) does not leave it stuck
    code = ("import fcntl, os, signal; fd = os.open(%r, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.kill(os.getpid(), signal.SIGKILL)") % str(tmp_path / ".train.lock")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert FileLock(tmp_path / ".train.lock").holder() is None


async def test_a_running_bot_notices_a_cli_rollback(tmp_path, base_model):
    other = build_dialogpt_model(tmp_path / "other", n_layer=1, seed=3)
    config = make_config(tmp_path, base_model)
    Registry(config.learning.registry).ensure_configured(str(other))     # v0001: an earlier model
    app = await Mynah.open(config)                                       # config names base_model: v0002
    try:
        assert app.engine.version == "v0002"
        Registry(config.learning.registry).rollback()                    # what `mynah rollback` does
        deadline = time.monotonic() + 10
        while app.learning.serving != "v0001" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        reply = await app.chat.handle(Incoming(platform="telegram", chat_id="c", user_id="u", text="hi"))
        rows = await app.db.fetchall("SELECT model_version FROM messages WHERE id = ?", (reply[0].stored_id,))
        assert rows[0][0] == "v0001"
    finally:
        await app.close()


async def test_a_model_that_does_not_load_is_never_registered(tmp_path, base_model):
    """[model] path that does not load: the bot does not start and no version names it, so
    the next start with a good path does not serve (or list) a ghost."""
    from engine.model import ModelLoadError

    config = make_config(tmp_path, tmp_path / "nope")
    with pytest.raises(ModelLoadError):
        await Mynah.open(config)
    assert Registry(config.learning.registry).versions() == []
    async with await Mynah.open(make_config(tmp_path, base_model)) as app:
        assert [v.name for v in app.learning.registry.versions()] == ["v0001"]
        assert app.learning.registry.get("v0001").source == str(base_model)


async def test_cli_rollback_answers_once_the_running_bot_serves_it(tmp_path, base_model, capsys):
    """`mynah rollback` / `mynah promote` move the pointer; they answer only after the running
    bot (which polls it) has swapped, so "now serves it" is true when printed."""
    import shutil

    from scripts.cli import main

    toml = tmp_path / "config.toml"
    toml.write_text(
        f'[model]\npath = "{base_model}"\n[storage]\npath = "{tmp_path / "mynah.sqlite3"}"\n[learning]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in {**FAST, "registry": str(tmp_path / "models"),
                                                         "poll_seconds": 1.0}.items()), encoding="utf-8")
    async with await Mynah.open(make_config(tmp_path, base_model, poll_seconds=1.0)) as app:
        registry = app.learning.registry
        shutil.copytree(base_model, tmp_path / "candidate")
        registry.add_fine_tuned(tmp_path / "candidate", parent="v0001", run_id=None, trained_through=0, metrics={},
                                activate=False, awaiting_approval=True)
        assert await asyncio.to_thread(main, ["--config", str(toml), "promote", "v0002"]) == 0
        assert app.engine.version == "v0002" and "the running bot now serves it" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["--config", str(toml), "rollback"]) == 0
        assert app.engine.version == "v0001" and "active: v0001 (was v0002)" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["--config", str(toml), "rollback", "v0002"]) == 0
    assert "no bot is running" in capsys.readouterr().out
