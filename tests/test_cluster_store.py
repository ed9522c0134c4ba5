"""The shared-state store several workers agree through (storage/cluster.py), on SQLite and on
PostgreSQL: update claims (exactly one winner, takeover from a dead worker), leases, workers."""
from __future__ import annotations

import asyncio
import time

import pytest

from storage import open_database
from storage.cluster import CLAIM_DONE, CLAIM_MINE, CLAIM_TAKEN, CLAIM_TAKEN_OVER, ClusterStore


@pytest.fixture
async def stores(storage_target):
    """Three workers' own database objects (own pools / connections) on one database."""
    dbs = [await open_database(storage_target) for _ in range(3)]
    yield [ClusterStore(db) for db in dbs]
    for db in dbs:
        await db.close()


async def test_one_update_claimed_by_three_workers_at_once_has_one_owner(stores):
    for i, store in enumerate(stores):
        await store.heartbeat(f"w{i}", "host", i, "v0001")
    for update in range(30):
        results = await asyncio.gather(*(s.claim("telegram", str(update), f"w{i}", stale_after=30)
                                         for i, s in enumerate(stores)))
        assert sorted(results) == [CLAIM_MINE, CLAIM_TAKEN, CLAIM_TAKEN], results
    owner = (await stores[0].claim_state("telegram", "0"))[0]
    await stores[0].mark("telegram", "0", owner, done=True)
    assert await stores[1].claim("telegram", "0", "w1", stale_after=30) in (CLAIM_DONE, CLAIM_MINE)
    assert (await stores[2].claim_state("telegram", "0"))[2] is not None


async def test_a_dead_workers_claims_are_taken_over_with_their_payload(stores):
    a, b, _ = stores
    await a.heartbeat("a", "h", 1, "v1")
    await b.heartbeat("b", "h", 2, "v1")
    assert await a.claim("telegram", "7", "a", stale_after=1.0, payload='{"update_id": 7}') == CLAIM_MINE
    await a.mark("telegram", "7", "a")                       # stored, reply not sent yet
    assert await b.claim("telegram", "7", "b", stale_after=1.0) == CLAIM_TAKEN
    assert await b.orphaned("telegram", "b", stale_after=1.0) == []      # a is alive
    await asyncio.sleep(1.2)
    await b.heartbeat("b", "h", 2, "v1")                     # a fell silent, b did not
    assert await b.orphaned("telegram", "b", stale_after=1.0) == [("7", '{"update_id": 7}')]
    assert (await b.claim_state("telegram", "7"))[0] == "b"
    assert await b.orphaned("telegram", "b", stale_after=1.0) == []      # taken once
    assert await a.claim("telegram", "8", "a", stale_after=1.0) == CLAIM_MINE   # a's, a dead worker's now
    assert await b.claim("telegram", "8", "b", stale_after=1.0) == CLAIM_TAKEN_OVER   # a redelivery takes it over
    assert await b.claim("telegram", "8", "b", stale_after=1.0) == CLAIM_MINE         # and b has it
    await b.stopped("b")
    assert not [w for w in await a.workers() if w.alive(time.time(), 1.0)]


async def test_a_lease_has_one_holder_until_it_expires(stores):
    a, b, c = stores
    won = await asyncio.gather(*(s.acquire("learner", name, 0.5) for s, name in zip(stores, "abc")))
    assert won.count(True) == 1
    winner = "abc"[won.index(True)]
    assert await a.holder("learner") == winner
    assert await stores[won.index(True)].acquire("learner", winner, 0.5)     # renewal
    await asyncio.sleep(0.7)                                                  # the holder died: it expires
    other = next(n for n in "abc" if n != winner)
    assert await stores["abc".index(other)].acquire("learner", other, 5)
    await stores["abc".index(other)].release("learner", other)
    assert await c.holder("learner") is None


async def test_shared_state(stores):
    await stores[0].set_state("active_version", "v0002")
    await stores[1].set_state("active_version", "v0003")
    assert await stores[2].state("active_version") == "v0003"
    assert await stores[2].state("missing") is None


async def test_done_claims_past_redelivery_age_are_forgotten(stores):
    store = stores[0]
    await store.heartbeat("w", "h", 1, None)
    for key in ("1", "2"):
        assert await store.claim("telegram", key, "w", stale_after=30) == CLAIM_MINE
    await store.mark("telegram", "1", "w", done=True)
    assert await store.forget_claims(older_than=time.time() + 1) == 1       # only the done one
    assert await store.claim_state("telegram", "1") is None
    assert await store.claim_state("telegram", "2") is not None
