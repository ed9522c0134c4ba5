"""Telegram delivery durability: acknowledge an update only once it is stored.

`getUpdates` with an offset acknowledges every earlier update, and PTB's Updater asks for
the next batch as soon as it has queued the last one. `AckGatedBot` holds that next request
until every fetched update is stored (the user's message is in SQLite) or fully handled,
so a crash can lose nothing Telegram already forgot; an update that was fetched but not
acknowledged is simply delivered again after a restart.

There is no deadline: while storage is unavailable (locked by another process, disk full)
the acknowledgement is held for as long as it takes, with a warning in the log every
`warn_every` seconds; Telegram keeps unacknowledged updates for 24 hours. On the way out
(`closing`), only updates below the oldest unstored one are acknowledged.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from telegram import Update
from telegram.ext import BaseUpdateProcessor, ExtBot

log = logging.getLogger(__name__)


class DeliveryTracker:
    """Which fetched updates are not yet stored / not yet handled.

    `before_ack()` waits until every fetched update is stored (or handled), so the next
    getUpdates, which acknowledges them, never forgets an unsaved message. `wait_idle()`
    waits until every fetched update is fully handled (reply sent)."""

    def __init__(self, warn_every: float = 30.0):
        self.warn_every = warn_every
        self.closing = False          # set on stop: acknowledge what is stored, wait for nothing
        self.on_finished = None       # (update_id) -> None, told when an update is fully handled
        self.admission = None         # the engine's AdmissionGate (engine/serving/admission.py), if it has one
        self._closed = asyncio.Event()
        self._waiters: dict[int, asyncio.Event] = {}   # update id -> set once it is stored
        self._unstored: set[int] = set()
        self._unfinished: set[int] = set()
        self._stored_all = asyncio.Event()
        self._finished_all = asyncio.Event()
        self._stored_all.set()
        self._finished_all.set()

    def fetched(self, update_ids: Iterable[int]) -> None:
        ids = set(update_ids)
        if ids:
            self._unstored |= ids
            self._unfinished |= ids
            self._stored_all.clear()
            self._finished_all.clear()

    def stored(self, update_id: int) -> None:
        self._unstored.discard(update_id)
        waiter = self._waiters.pop(update_id, None)
        if waiter is not None:
            waiter.set()
        if not self._unstored:
            self._stored_all.set()

    def finished(self, update_id: int) -> None:
        self.stored(update_id)
        self._unfinished.discard(update_id)
        if self.on_finished is not None:     # several workers: the claim is marked done
            self.on_finished(update_id)
        if not self._unfinished:
            self._finished_all.set()

    def close(self) -> None:
        """Stopping: acknowledge only what is stored, and stop waiting for the rest."""
        self.closing = True
        self._closed.set()

    def in_progress(self, update_id: int) -> bool:
        return update_id in self._unfinished

    async def wait_stored(self, update_id: int) -> bool:
        """Until this update is stored (or handled): True; False when stopping first."""
        if update_id not in self._unstored:
            return True
        waiter = self._waiters.setdefault(update_id, asyncio.Event())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({asyncio.ensure_future(waiter.wait()), closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        return update_id not in self._unstored

    @property
    def unstored(self) -> int:
        return len(self._unstored)

    async def before_ack(self, offset: int) -> int:
        """The offset that is safe to send: wait until every fetched update is stored; when
        closing, wait for nothing and confirm only the updates below the oldest unstored one."""
        held = 0.0
        while self._unstored and not self.closing:
            try:
                await asyncio.wait_for(self._stored_all.wait(), self.warn_every)
            except TimeoutError:
                held += self.warn_every
                log.warning("telegram: holding the acknowledgement of %d update(s) for %.0f s: not stored yet "
                            "(storage unavailable?); Telegram keeps them until they are", len(self._unstored), held)
        if held:
            log.warning("telegram: every fetched update is stored after %.0f s; acknowledging", held)
        if self._unstored:
            return min(offset, min(self._unstored))
        return offset

    async def wait_idle(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._finished_all.wait(), timeout)


class AckGatedBot(ExtBot):
    """An ExtBot whose getUpdates acknowledges only what is stored (see DeliveryTracker)."""

    __slots__ = ("_tracker",)

    def __init__(self, *args, tracker: DeliveryTracker, **kwargs):
        super().__init__(*args, **kwargs)
        self._tracker = tracker

    async def get_updates(self, offset: int | None = None, *args, **kwargs):
        if offset:  # a positive offset confirms every update below it
            offset = await self._tracker.before_ack(offset)
        updates = await super().get_updates(offset, *args, **kwargs)
        self._tracker.fetched(u.update_id for u in updates)
        if self._tracker.admission is not None:  # one fetch, one batch: the engine admits their replies together
            self._tracker.admission.hold(len(updates))
        return updates


class TrackingUpdateProcessor(BaseUpdateProcessor):
    """Concurrent update processing (chats never wait on each other) that reports when each
    update is done, whatever handler (or none) took it."""

    def __init__(self, max_concurrent_updates: int, tracker: DeliveryTracker):
        super().__init__(max_concurrent_updates)
        self._tracker = tracker

    async def do_process_update(self, update, coroutine) -> None:
        gate = self._tracker.admission
        try:
            with gate.ticket() if gate is not None else contextlib.nullcontext():
                await coroutine
        finally:
            if isinstance(update, Update):
                self._tracker.finished(update.update_id)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass
