"""When the learning loop runs: the schedule's syntax, the APScheduler job, the last fire and check.

The schedule is an interval like "6h" / "30m" or a 5-field cron line. The job is an
APScheduler AsyncIOScheduler job in the bot's event loop (coalesced, one instance at a
time, with a misfire grace). An in-memory interval job starts counting afresh with every
start of the bot, so the last fire is kept on disk (``.schedule.json`` in the registry) and
a fire that fell due while the bot was down happens shortly after startup instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from bots.learning.notify import configured_targets
from bots.learning.runs import AlreadyRunning, Runs
from engine.registry import write_json_atomic

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
JOB_ID = "mynah-retrain"
STARTUP_DELAY_S = 60.0         # an overdue interval job fires this long after startup
STATE_FILE = ".schedule.json"


@dataclass(frozen=True)
class Schedule:
    interval_seconds: float | None = None
    cron: str | None = None


def parse_schedule(text: str) -> Schedule:
    """Return the schedule, or raise ValueError saying what forms are accepted."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds <= 0:
            raise ValueError("the interval must be longer than 0")
        return Schedule(interval_seconds=seconds)
    if len(text.split()) == 5:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(text)  # raises ValueError on a bad field
        return Schedule(cron=text)
    raise ValueError(f"{text!r} is neither an interval (e.g. '6h', '30m') nor a cron line ('0 4 * * *')")


class ScheduleState:
    """The last time the job fired, kept in the registry folder so it survives restarts
    (blocking file I/O: call it from a thread in the event loop)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def last_fire(self) -> float | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")).get("last_fire")
        except (OSError, ValueError, AttributeError):
            return None

    def save(self, last_fire: float) -> None:
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"last_fire": last_fire})

    def first_fire(self, interval: float) -> dt.datetime:
        """When an interval job should fire first: a whole interval after the last fire, but
        no sooner than shortly after startup; the first start ever counts as a fire."""
        now = time.time()
        last = self.last_fire()
        if last is None:
            self.save(now)
            last = now
        return dt.datetime.fromtimestamp(max(now + min(interval, STARTUP_DELAY_S), last + interval), dt.timezone.utc)


def start_scheduler(schedule: Schedule, job: Callable[[], Awaitable[None]], *, misfire_grace_seconds: int,
                    first_fire: dt.datetime | None = None):
    """Start an AsyncIOScheduler (in the running event loop) with the retrain job; returns it."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                               "misfire_grace_time": int(misfire_grace_seconds)})
    kwargs = {}
    if schedule.interval_seconds is not None:
        trigger = IntervalTrigger(seconds=schedule.interval_seconds)
        if first_fire is not None:
            kwargs["next_run_time"] = first_fire
    else:
        trigger = CronTrigger.from_crontab(schedule.cron)
    scheduler.add_job(job, trigger, id=JOB_ID, name="scheduled retrain", replace_existing=True, **kwargs)
    scheduler.start()
    return scheduler


def next_run_time(scheduler) -> dt.datetime | None:
    if scheduler is None:
        return None
    job = scheduler.get_job(JOB_ID)
    return job.next_run_time if job is not None else None


class Scheduler:
    """The scheduled job: start a run when enough is new, else note why not (for /status).
    """

    def __init__(self, lc, runs: Runs, folder: str | Path):
        self.lc = lc
        self.runs = runs
        self.state = ScheduleState(folder)
        self.scheduler = None
        self.fires = 0
        self.last_check: tuple[float, str] | None = None

    async def start(self) -> None:
        sched = parse_schedule(self.lc.schedule)
        first = None
        if sched.interval_seconds is not None:
            first = await asyncio.to_thread(self.state.first_fire, sched.interval_seconds)
        self.scheduler = start_scheduler(sched, self.fire, misfire_grace_seconds=self.lc.misfire_grace_seconds,
                                         first_fire=first)
        log.info("learning loop: scheduled %s; next run %s", self.lc.schedule, self.next_run_time())

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None

    def next_run_time(self) -> dt.datetime | None:
        """When the scheduled job fires next, or None when the schedule is off."""
        return next_run_time(self.scheduler)

    async def enough_new(self) -> bool:
        """Whether [learning] min_new_messages new user messages arrived; notes it when not."""
        new, _ = await self.runs.new_messages()
        if new >= self.lc.min_new_messages:
            return True
        self.last_check = (time.time(), f"skipped: {new} new user messages, {self.lc.min_new_messages} needed")
        return False

    async def fire(self) -> None:
        """The job. Never raises."""
        self.fires += 1
        try:
            await asyncio.to_thread(self.state.save, time.time())
            if self.runs.running is not None:
                self.last_check = (time.time(), f"run #{self.runs.running.run_id} was still running")
                return
            if not await self.enough_new():
                log.info("scheduled retrain %s", self.last_check[1])
                return
            run_id = await self.runs.start("schedule", notify_to=configured_targets(self.lc.notify))
            self.last_check = (time.time(), f"started run #{run_id}")
        except AlreadyRunning as exc:
            self.last_check = (time.time(), f"{exc} (another process)")
        except Exception:
            log.exception("the scheduled retrain could not start")
            self.last_check = (time.time(), "error: could not start (see the log)")
