"""One delivery handled by two workers at once (a live worker taken for dead under load, or a
takeover racing a slow owner): the database itself keeps one stored copy of the message and
one live answer to it (migration 9). Real SQLite files and real PostgreSQL (MYNAH_TEST_PG_URL),
the real ChatService and a real tiny model."""
from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

import storage.db as dbmod
from bots.app import Mynah
from bots.chat.events import Incoming
from bots.config import parse_config
from storage import open_database
from storage.cluster import ClusterStore
from storage.messages import MessageGone
from storage.store import Store

pytestmark = pytest.mark.timeout(180)
IDS = itertools.count(100)


def config_for(target: str, model, **chat):
    where = {"url": target} if "://" in target else {"path": target}
    return parse_config({"model": {"path": str(model)}, "storage": where, "generation": {"max_new_tokens": 3},
                         "chat": {"stream": False, **chat}})


async def live_answers(db, user_message: int) -> list[tuple]:
    rows = await db.fetchall("SELECT id, status FROM messages WHERE reply_to_id = ? AND role = 'bot' ORDER BY id",
                             (user_message,))
    return [tuple(r) for r in rows if r[1] in ("ok", "pending")]


async def test_two_workers_handling_one_delivery_store_it_once_and_answer_once(pg_url, tiny_dialogpt, caplog):
    caplog.set_level(logging.WARNING)
    config = config_for(pg_url, tiny_dialogpt, rate_limit_messages=100)
    apps = [await Mynah.open(config), await Mynah.open(config)]
    try:
        for _ in range(8):
            msg = Incoming("telegram", "9300", "9300", "hello, who is this?", chat_type="private",
                           message_id=str(next(IDS)))
            outs = [o for answer in await asyncio.gather(*(app.chat.handle(msg) for app in apps)) for o in answer]
            assert len(outs) == 1, [o.text for o in outs]                     # one of them answers
            await apps[0].chat.delivered(outs[0], str(next(IDS)))             # sent: confirmed
        db = apps[0].store.db
        users = await db.fetchall("SELECT id, platform_message_id FROM messages WHERE role = 'user' ORDER BY id")
        assert len(users) == 8 and len({r[1] for r in users}) == 8                # each stored once
        for user_id, _ in users:
            assert [s for _, s in await live_answers(db, user_id)] == ["ok"]       # one confirmed answer each
    finally:
        for app in apps:
            await app.close()
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_worker_taken_for_dead_does_not_confirm_a_second_answer(storage_target, tiny_dialogpt, caplog):
    """The owner stored its reply 'pending' and is still sending it when a survivor takes the
    update over: the survivor fails that reply and answers; the owner's late confirmation
    leaves its reply 'failed', and a streamed row it held cannot come back to life."""
    caplog.set_level(logging.WARNING)
    async with await Mynah.open(config_for(storage_target, tiny_dialogpt)) as app:
        chat, cluster = app.chat, ClusterStore(app.store.db)
        for streamed in (False, True):
            msg = Incoming("telegram", "9400", "9400", "are you there?", chat_type="private",
                           message_id=str(next(IDS)))
            chat_id, stored, handled = await chat.log_user_message(msg, msg.text)
            assert not handled
            reply = await chat.generate(msg, await chat.build_context(chat_id))
            held = await chat.hold_reply(chat_id, stored, msg) if streamed else None
            owners = None if streamed else await chat.log_reply(chat_id, stored, msg, reply)
            assert await cluster.fail_pending_replies("telegram", "9400", msg.message_id) == 1   # the takeover
            survivors = await chat.log_reply(chat_id, stored, msg, reply)
            assert survivors is not None
            if streamed:   # the owner finishing its streamed row: dropped, the row stays failed
                assert await chat.log_reply(chat_id, stored, msg, reply, held=held) is None
            else:          # the owner's send went out after all: recorded, but as failed
                await chat.delivered(owners, "555")
            await chat.delivered(survivors, "556")
            assert await live_answers(app.store.db, stored) == [(survivors.stored_id, "ok")]
            # a redelivery now finds it answered
            assert (await chat.log_user_message(msg, msg.text))[2] is True
    assert "another worker" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


async def test_log_once_refuses_a_second_copy_and_a_second_live_answer(storage_target):
    db = await open_database(storage_target)
    try:
        store = Store.over(db)
        chat = await store.chats.chat("telegram", "9500")
        first = await store.messages.log_once(chat, "user", "hi", platform_message_id=7)
        copies = await asyncio.gather(*(store.messages.log_once(chat, "user", "hi", platform_message_id=7)
                                        for _ in range(6)))
        assert first is not None and copies == [None] * 6
        assert await store.messages.log_once(chat, "user", "no id") != await store.messages.log_once(
            chat, "user", "no id")                                         # messages without an id are many
        other = await store.chats.chat("telegram", "9501")
        assert await store.messages.log_once(other, "user", "hi", platform_message_id=7) is not None

        answers = await asyncio.gather(*(store.messages.log_once(chat, "bot", f"a{i}", status="pending",
                                                                 reply_to_id=first) for i in range(6)))
        live = [a for a in answers if a is not None]
        assert len(live) == 1
        assert await store.messages.set_status(live[0], "failed") is True
        again = await store.messages.log_once(chat, "bot", "again", status="pending", reply_to_id=first)
        assert again is not None
        assert await store.messages.set_status(live[0], "ok") is False           # stays failed
        assert await live_answers(db, first) == [(again, "pending")]

        await store.messages.set_status(again, "failed")
        async with db.transaction() as conn:
            await conn.execute("DELETE FROM messages WHERE id = ?", (first,))   # /forget meanwhile
        with pytest.raises(MessageGone):
            await store.messages.log_once(chat, "bot", "late", status="pending", reply_to_id=first)
    finally:
        await db.close()


async def test_a_reply_to_a_message_forgotten_meanwhile_is_dropped_on_either_backend(storage_target, tiny_dialogpt,
                                                                                      caplog):
    caplog.set_level(logging.INFO)
    async with await Mynah.open(config_for(storage_target, tiny_dialogpt)) as app:
        msg = Incoming("telegram", "-5", "7", "hello there", chat_type="group", message_id="11", mentions_bot=True)
        chat_id, stored, _ = await app.chat.log_user_message(msg, "hello there")
        reply = await app.chat.generate(msg, await app.chat.build_context(chat_id))
        await app.chat.user.command_forget([], msg)
        assert await app.chat.log_reply(chat_id, stored, msg, reply) is None
        assert list(await app.db.fetchall("SELECT role FROM messages")) == []
    assert "forgotten while its reply was written" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_migration_9_keeps_every_copy_and_the_confirmed_answer(storage_target, monkeypatch):
    monkeypatch.setattr(dbmod, "MIGRATIONS", dbmod.MIGRATIONS[:8])
    old = await open_database(storage_target)
    store = Store.over(old)
    chat = await store.chats.chat("telegram", "9600")
    asked = await store.messages.log_message(chat, "user", "hello", platform_message_id=3)
    copy = await store.messages.log_message(chat, "user", "hello", platform_message_id=3)
    pending = await store.messages.log_message(chat, "bot", "hi (pending)", reply_to_id=asked, status="pending")
    sent = await store.messages.log_message(chat, "bot", "hi (sent)", reply_to_id=asked, status="ok")
    sent_too = await store.messages.log_message(chat, "bot", "hi (sent too)", reply_to_id=asked, status="ok")
    other = await store.messages.log_message(chat, "user", "later", platform_message_id=4)
    one = await store.messages.log_message(chat, "bot", "only one", reply_to_id=other, status="pending")
    await old.close()
    monkeypatch.undo()

    db = await open_database(storage_target)
    try:
        assert await db.user_version() == len(dbmod.MIGRATIONS)
        rows = {r[0]: tuple(r[1:]) for r in await db.fetchall("SELECT id, text, platform_message_id, status "
                                                                "FROM messages")}
        assert rows[asked] == ("hello", "3", "ok") and rows[copy] == ("hello", None, "ok")   # text kept
        assert rows[sent][2] == "ok" and rows[pending][2] == "failed" and rows[sent_too][2] == "failed"
        assert rows[one][2] == "pending" and rows[other][1] == "4"
        assert await Store.over(db).messages.log_once(chat, "user", "hello", platform_message_id=3) is None
    finally:
        await db.close()
