"""One learner across workers on PostgreSQL (bots/cluster.py): the learner lease keeps two
workers from training at once even when their registry file locks do not reach each other
(two machines), a dead learner's lease lapses and its 'running' run is marked interrupted by
a survivor, and /status lists the workers. Real PostgreSQL (MYNAH_TEST_PG_URL)."""
from __future__ import annotations

import asyncio
import time

from bots.cluster import LEARNER_LEASE, Presence, share_learning
from bots.config import parse_config
from bots.learning.loop import Learning
from engine.registry import Registry
from storage import open_database
from storage.cluster import ClusterStore
from storage.store import Store


async def _worker(pg_url, registry_root, heartbeat=0.2, stale=1.0):
    db = await open_database(pg_url)
    presence = await Presence(ClusterStore(db), heartbeat_s=heartbeat, stale_after_s=stale,
                              version=lambda: "v0001").start()
    config = parse_config({"storage": {"url": pg_url}, "learning": {"registry": str(registry_root)}})
    learning = Learning(config, Registry(registry_root), Store.over(db))
    share_learning(presence, learning)
    return db, presence, learning


async def test_one_learner_and_a_dead_learners_run_is_marked_interrupted(pg_url, tmp_path):
    # two machines: each its own registry folder, so only the database lease keeps them apart
    a_db, a, a_learning = await _worker(pg_url, tmp_path / "machine-a")
    b_db, b, b_learning = await _worker(pg_url, tmp_path / "machine-b")
    try:
        lock_a, lock_b = a_learning.runs.train_lock(), b_learning.runs.train_lock()
        got = await asyncio.gather(asyncio.to_thread(lock_a.acquire), asyncio.to_thread(lock_b.acquire))
        assert sorted(got) == [False, True]                         # two /retrain at once: one run
        holder, learner = (lock_a, a) if got[0] else (lock_b, b)
        assert await a.store.holder(LEARNER_LEASE) == learner.id
        await asyncio.sleep(1.5)                                    # renewed with the heartbeat: still held
        assert await a.store.holder(LEARNER_LEASE) == learner.id
        holder.release()
        await asyncio.sleep(0.3)
        assert await a.store.holder(LEARNER_LEASE) is None

        # a learns and dies mid-run (SIGKILL: no release, no heartbeat)
        lock_a = a_learning.runs.train_lock()
        assert await asyncio.to_thread(lock_a.acquire)
        run_id = await a_learning.store.runs.start_training_run("schedule")
        a._task.cancel()
        lock_a._held = False                                         # the dead process renews nothing
        a.on_beat.clear()
        started = time.monotonic()
        while (await b_learning.store.runs.training_run(run_id))["status"] == "running":
            assert time.monotonic() - started < 30, "the dead learner's run was never marked interrupted"
            await asyncio.sleep(0.2)
        taken_over_s = time.monotonic() - started
        assert (await b_learning.store.runs.training_run(run_id))["status"] == "interrupted"
        assert taken_over_s < 60
        lock_b = b_learning.runs.train_lock()
        assert await asyncio.to_thread(lock_b.acquire)               # the survivor may learn now
        lock_b.release()
        lines = await b.status_lines()
        assert lines[0].startswith("Workers: 1 alive of 2") and any("(this one): alive" in x for x in lines)
    finally:
        for presence, db in ((a, a_db), (b, b_db)):
            await presence.stop()
            await db.close()


async def test_every_worker_serves_a_promotion_within_10_seconds(pg_url, tmp_path, tiny_dialogpt):
    """Three workers (each its own engine) on one database and one registry folder, the
    shipped poll_seconds: a promotion on one is served by all of them within 10 s."""
    import shutil

    from bots.app import Mynah
    from bots.config import load_config

    config_file = tmp_path / "worker.toml"
    config_file.write_text(f'[model]\npath = "{tiny_dialogpt}"\n[storage]\nurl = "{pg_url}"\n'
                           f'[learning]\nenabled = true\nschedule = "24h"\nregistry = "{tmp_path / "registry"}"\n', encoding="utf-8")
    config = load_config(config_file)
    assert config.learning.poll_seconds == parse_config({}).learning.poll_seconds      # as shipped
    workers = [await Mynah.open(config) for _ in range(3)]
    try:
        assert len({w.engine.version for w in workers}) == 1
        candidate = tmp_path / "candidate"
        shutil.copytree(tiny_dialogpt, candidate)
        promoter = workers[0]
        version = await asyncio.to_thread(promoter.learning.registry.add_fine_tuned, candidate, parent=workers[0].engine.version,
                                          run_id=None, trained_through=0, metrics={"held_out_loss": 2.0})
        promoted_at = time.monotonic()
        await promoter.learning.check_pointer()                     # the promoting worker swaps at once
        while {w.engine.version for w in workers} != {version.name}:
            assert time.monotonic() - promoted_at < 10.0, [w.engine.version for w in workers]
            await asyncio.sleep(0.1)
        print(f"\nevery worker served {version.name} {time.monotonic() - promoted_at:.1f} s after the promotion")
    finally:
        for w in workers:
            await w.close()
