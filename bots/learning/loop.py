"""The learning loop of one bot (or one `mynah retrain`): its parts, built once and wired here.

Each part gets what it needs at construction; none holds this facade:

* runs.Runs: one run, start to end (lock, export, train in the child, decide, promote, record, tell);
* schedule.Scheduler: the APScheduler job that starts runs when enough is new;
* versions.Versions: the SQLite mirror of the registry, rollback, following the pointer, /models;
* promote.Promoter: every change of what is served (load, pointer, hot swap), under one lock;
* trust.Trust: lineage, /forget (taint, switch, rebuild) and /promote approval;
* canary.Canary (optional): a passing candidate serves a share of chats before promotion;
* commands.LearningCommands: /retrain, /rollback, /models (after bots/chat/admin.py's ACL);
* notify.Notifiers: who hears about a run. Adapters register `add_notifier(platform, fn)`.
"""
from __future__ import annotations

import asyncio
import contextlib

from bots.chat.events import Outgoing
from bots.learning import report
from bots.learning.canary import Canary, CanaryServing
from bots.learning.commands import LearningCommands
from bots.learning.notify import Notifier, Notifiers, ProgressListener
from bots.learning.promote import Promoter
from bots.learning.report import RunResult
from bots.learning.runs import AlreadyRunning, RunState, Runs  # noqa: F401 (AlreadyRunning: re-exported)
from bots.learning.schedule import Scheduler
from bots.learning.trust import Trust
from bots.learning.versions import Versions
from engine.registry import Registry, Version


class Learning:
    """Composition and lifecycle; the parts do the work."""

    def __init__(self, config, registry: Registry, store, engine=None, *, serving: str | None = None,
                 canary: CanaryServing | None = None):
        self.config = config
        self.lc = config.learning
        self.registry = registry
        self.store = store      # storage.store.Store
        self.engine = engine
        self.notifiers = Notifiers()
        self.promoter = Promoter(config, registry, engine, serving=serving)
        lineage = store.trust
        self.versions = Versions(registry, store, self.promoter, lineage)
        self.canary = None if canary is None else Canary(
            config, registry, store, self.promoter, self.versions, self.notifiers,
            canary.router, canary.recorder, canary.make_engine)
        self.runs = Runs(config, registry, store, lineage, self.promoter, self.notifiers, engine=engine,
                         canary=self.canary)
        self.schedule = Scheduler(self.lc, self.runs, registry.root)
        self.trust = Trust(self.lc, registry, lineage, self.promoter, self.versions, self.runs, self.canary)
        self.commands = LearningCommands(self.lc, self.runs, self.versions)
        self._poller: asyncio.Task | None = None

    async def start(self, *, schedule: bool | None = None) -> None:
        """Tidy what a crash left, mirror the versions into SQLite, start the job, the poller
        and (in a bot) the canary."""
        await self.runs.recover()
        await self.versions.sync()
        await self.promoter.start()
        if schedule if schedule is not None else self.lc.enabled:
            await self.schedule.start()
        if self.engine is not None and self._poller is None:
            self._poller = asyncio.create_task(self.promoter.poll(), name="mynah-learning-poll")
        if self.canary is not None and self.canary.router is not None:
            await self.canary.start()

    async def stop(self) -> None:
        """Stop the canary, the job and the poller; a run in flight is stopped (its trainer killed) and recorded."""
        if self.canary is not None:
            await self.canary.stop()
        await self.trust.stop()
        self.schedule.stop()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self.promoter.stop()
        run = self.runs.current
        if run is not None and run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task

    def add_notifier(self, platform: str, fn: Notifier) -> None:
        """`await fn(chat_id, Outgoing)` delivers a run's result to a chat of `platform`.

        When the asker was in a thread / forum topic, it is called as
        `fn(chat_id, Outgoing, thread_id=...)`; adapters with threads take that keyword."""
        self.notifiers.add(platform, fn)

    def add_progress_listener(self, fn: ProgressListener) -> None:
        self.notifiers.add_listener(fn)

    async def notify(self, targets: list[tuple], out: Outgoing) -> None:
        """Send `out` to each (platform, chat_id[, thread_id]) through that platform's notifiers."""
        await self.notifiers.notify(targets, out)

    @property
    def running(self) -> RunState | None:
        return self.runs.running

    @property
    def serving(self) -> str | None:
        return self.promoter.serving

    async def start_run(self, trigger: str, *, force: bool = True, notify_to: list[tuple] | None = None) -> int:
        return await self.runs.start(trigger, force=force, notify_to=notify_to)

    async def run_once(self, trigger: str, *, force: bool = False,
                       notify_to: list[tuple] | None = None) -> RunResult | None:
        """One run, awaited (the CLI). Without force, returns None when too little is new."""
        if not force and not await self.schedule.enough_new():
            return None
        await self.runs.start(trigger, force=force, notify_to=notify_to)
        return await self.runs.wait()

    async def wait(self) -> RunResult | None:
        """Wait for the run in flight (if any) and return its result."""
        return await self.runs.wait()

    async def sync_versions(self) -> None:
        await self.versions.sync()

    async def check_pointer(self) -> bool:
        return await self.versions.check_pointer()

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        return await self.versions.rollback(target, who=who)

    async def status_lines(self) -> list[str]:
        """The learning loop's part of /status."""
        return await report.status_lines(self.config, self.registry, self.serving, self.runs, self.schedule,
                                         self.trust, self.canary)
