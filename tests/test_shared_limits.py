"""One rate limit per user across workers (bots/chat/shared_limit.py over storage/rates.py):
a user whose messages a load balancer spreads over two workers gets the limit once, not
twice, and one notice. Real PostgreSQL (MYNAH_TEST_PG_URL), two connections as two workers."""
from __future__ import annotations

import asyncio
import itertools

from bots.chat.ratelimit import RateLimiter
from bots.chat.shared_limit import SharedRateLimiter
from storage import open_database
from storage.rates import RateStore


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_two_workers_share_one_limit_and_one_notice(pg_url):
    dbs = [await open_database(pg_url) for _ in range(2)]
    clock = Clock(6030.0)          # the middle of the window [6000, 6060)
    workers = [SharedRateLimiter(RateStore(db), RateLimiter(3, 60.0), clock=clock) for db in dbs]
    try:
        verdicts = await asyncio.gather(*(workers[i % 2].check(("t", "flood")) for i in range(10)))
        assert sum(v.allowed for v in verdicts) == 3                 # 3 per window, not 3 per worker
        assert sum(v.notify for v in verdicts) == 1                  # one "slow down" between them
        assert all(0 < v.retry_in <= 60 for v in verdicts if not v.allowed)
        assert (await workers[1].check(("t", "other"))).allowed      # per user
        clock.now = 6059.0                                           # the same window: still over
        assert (await workers[0].check(("t", "flood"))).allowed is False
        clock.now = 6090.0             # half of the last window still inside the sliding minute: 3 x 1/2
        assert [(await w.check(("t", "flood"))).allowed for w in (workers[1], workers[0], workers[1])] == [
            True, True, False]
    finally:
        for db in dbs:
            await db.close()


async def test_an_unreachable_database_leaves_the_decision_to_the_worker(pg_url):
    db = await open_database(pg_url)
    limiter = SharedRateLimiter(RateStore(db), RateLimiter(2, 60.0))
    await db.close()                                                  # the shared count is gone
    assert [(await limiter.check(("t", "u"))).allowed for _ in range(3)] == [True, True, False]


IDS = itertools.count(1)


async def test_through_two_bots_a_user_gets_the_limit_once(pg_url, tmp_path, tiny_dialogpt):
    from bots.app import Mynah
    from bots.chat.events import Incoming
    from bots.config import parse_config

    config = parse_config({"model": {"path": str(tiny_dialogpt)}, "storage": {"url": pg_url},
                           "generation": {"max_new_tokens": 2},
                           "chat": {"stream": False, "rate_limit_messages": 2, "rate_limit_seconds": 600}})
    apps = [await Mynah.open(config), await Mynah.open(config)]
    try:
        answers = []
        for i in range(5):              # round robin, as nginx spreads one user's messages
            msg = Incoming("telegram", "9100", "9100", f"message {i}", chat_type="private", message_id=str(next(IDS)))
            answers.append([o.text for o in await apps[i % 2].chat.handle(msg)])
        replies = [a for a in answers if a and "faster than I can think" not in a[0]]
        notices = [a for a in answers if a and "faster than I can think" in a[0]]
        assert len(replies) == 2 and len(notices) == 1, answers
        rows = await apps[0].store.db.fetchall(
            "SELECT m.status FROM messages m JOIN chats c ON c.id = m.chat_id WHERE c.platform_chat_id = '9100' "
            "AND m.role = 'user' ORDER BY m.id")
        assert [r[0] for r in rows] == ["ok", "ok", "limited", "limited", "limited"]   # every message logged
    finally:
        for app in apps:
            await app.close()
