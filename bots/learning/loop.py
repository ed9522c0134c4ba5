"""The learning loop: scheduled and on-demand fine-tuning on the logged conversations.

One run, start to end (``Learning.run_once`` / ``start_run``):

1. take the training lock (an flock in the registry: one run at a time, across processes,
   and the OS drops it if the holder dies);
2. export from SQLite what is new since the active version (opted-in chats only; forgotten
   messages are gone from the table and filtered again by id), plus a replay sample of
   older logs and of the base corpus; the newest slice of the new dialogues is held out;
3. fine-tune the active model in a child process (``python -m engine.training.finetune``: nice,
   few threads, bounded memory), which also scores the active model and the candidate on
   the same held-out dialogues and the same fixed base-corpus sample;
4. promote only when the held-out loss fell by ``promote_margin`` and the base loss rose by
   no more than ``base_loss_tolerance`` (and nothing is NaN, the candidate loads, no
   exported message was forgotten meanwhile, the active version did not change meanwhile);
   promotion renames the candidate into the registry, replaces the pointer atomically and
   hot-swaps the engine between batches;
5. record the run (training_runs), clean up the exported text, tell whoever asked.

The scheduler is an APScheduler AsyncIOScheduler job in the bot's event loop; admin
commands (/retrain, /rollback, /models, /status lines) come through bots/chat/admin.py, after
its ACL. Adapters register `add_notifier(platform, async fn(chat_id, Outgoing))` so a
run's result (numbers + loss-curve picture) reaches the chat that asked for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from bots.chat.events import Incoming, Outgoing
from bots.learning.schedule import parse_schedule
from engine.registry import FileLock, Registry, RegistryError, Version, folder_bytes, parse_version, write_json_atomic

log = logging.getLogger(__name__)

Notifier = Callable[..., Awaitable[None]]   # async fn(chat_id, Outgoing[, thread_id=...])
ProgressListener = Callable[[dict], None]

BASE_SAMPLE_SEED = 1234        # the base-corpus evaluation sample never changes between runs
STARTUP_DELAY_S = 60.0         # an overdue interval job fires this long after startup
KEEP_RUN_FOLDERS = 30


class AlreadyRunning(RuntimeError):
    """Another run holds the training lock."""

    def __init__(self, holder: dict | None):
        self.holder = holder or {}
        run = self.holder.get("run_id")
        super().__init__(f"a retrain is already running{f' (run #{run})' if run else ''}")


class RunFailed(RuntimeError):
    """A run that ends with a clear reason (disk full, out of memory, trainer killed …)."""


@dataclass
class RunResult:
    run_id: int
    status: str                      # done | failed | skipped | interrupted
    decision: str                    # promoted | rejected | skipped | failed | interrupted
    reason: str = ""
    promoted: str | None = None      # the new version, when promoted
    base_version: str = ""
    losses: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    duration_s: float = 0.0
    loss_curve: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def summary(self) -> str:
        """What admins read: the decision, the numbers, the data counts."""
        head = {
            "promoted": f"Retrain run #{self.run_id} finished in {_duration(self.duration_s)}: promoted, "
                        f"now serving {self.promoted} (was {self.base_version}).",
            "rejected": f"Retrain run #{self.run_id} finished in {_duration(self.duration_s)}: not promoted, "
                        f"still serving {self.base_version}. {self.reason}",
            "skipped": f"Retrain run #{self.run_id} skipped: {self.reason}",
        }.get(self.decision, f"Retrain run #{self.run_id} {self.status} after {_duration(self.duration_s)}: "
                             f"{self.reason}")
        lines = [head]
        before, after = self.losses.get("before") or {}, self.losses.get("after") or {}
        d = self.data
        if before.get("held_out") is not None and after.get("held_out") is not None:
            lines.append(f"Held-out loss ({d.get('held_out', '?')} newest dialogues): "
                         f"{_delta(before['held_out'], after['held_out'])}")
        if before.get("base") is not None and after.get("base") is not None:
            lines.append(f"Base-corpus loss ({d.get('base_eval', '?')} dialogues): "
                         f"{_delta(before['base'], after['base'])}")
        if "train_new" in d:
            lines.append(f"Data: {d.get('new_dialogues', 0)} new dialogues ({d['train_new']} trained on, "
                         f"{d.get('held_out', 0)} held out), {d.get('replay_old', 0)} older replayed, "
                         f"{d.get('replay_base', 0)} from the base corpus"
                         + (f"; {d['steps']} steps" if d.get("steps") is not None else "") + ".")
        return "\n".join(lines)


def _delta(before: float, after: float) -> str:
    return f"{before:.4f} → {after:.4f} ({after - before:+.4f})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m"


def _project_root() -> str:
    """The folder that holds the engine package (the child imports it from there)."""
    import engine

    return str(Path(engine.__file__).resolve().parent.parent)


@dataclass
class _Run:
    run_id: int
    trigger: str
    force: bool
    lock: FileLock
    notify_to: list[tuple]
    started: float = field(default_factory=time.time)
    stage: str = "starting"
    step: int = 0
    total_steps: int = 0
    pid: int | None = None
    task: asyncio.Task | None = None
    folder: Path | None = None


class Learning:
    """The learning loop of one bot (or one `mynah retrain`)."""

    def __init__(self, config, registry: Registry, conversations, engine=None, *, serving: str | None = None):
        self.config = config
        self.lc = config.learning
        self.registry = registry
        self.conversations = conversations
        self.engine = engine
        self._serving = serving if serving is not None else (engine.version if engine is not None else None)
        self._notifiers: dict[str, list[Notifier]] = {"console": [self._print_notice]}
        self._console_default = True
        self._listeners: list[ProgressListener] = []
        self._run: _Run | None = None
        self._start_lock = asyncio.Lock()
        self._swap_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._stamp = registry.pointer_stamp()
        self._base_cache: tuple[str, list[list[str]]] | None = None
        self.scheduler = None
        self.schedule_fires = 0
        self.last_check: tuple[float, str] | None = None
        self.last_result: RunResult | None = None

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self, *, schedule: bool | None = None) -> None:
        """Tidy what a crash left, mirror the versions into SQLite, start the job and the poller."""
        await self.recover()
        await self.sync_versions()
        if schedule if schedule is not None else self.lc.enabled:
            await self._start_scheduler()
        if self.engine is not None and self._poller is None:
            self._poller = asyncio.create_task(self._poll_pointer(), name="mynah-learning-poll")

    async def stop(self) -> None:
        """Stop the job and the poller; a run in flight is stopped (its trainer killed) and recorded."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        run = self._run
        if run is not None and run.task is not None and not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run.task

    async def recover(self) -> None:
        """When no run holds the lock: rows left 'running' are marked interrupted, temp
        folders and exported text from dead runs are deleted."""
        lock = self.registry.train_lock()
        if not await asyncio.to_thread(lock.acquire):
            return  # a run is going on in another process: leave its files alone
        try:
            ids = await self.conversations.interrupt_running_runs(
                "interrupted: the process running it stopped (crash, kill or shutdown)")
            if ids:
                log.warning("training run(s) %s were interrupted by a stop; marked as such", ids)
            await asyncio.to_thread(self._clean_files)
        finally:
            lock.release()

    def _clean_files(self) -> None:
        removed = self.registry.clean_stale()
        runs = self.registry.runs_dir()
        if runs.is_dir():
            folders = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("run-"))
            for folder in folders:
                _strip_run_folder(folder)
            for folder in folders[:-KEEP_RUN_FOLDERS]:
                shutil.rmtree(folder, ignore_errors=True)
        if removed:
            log.info("removed leftovers from interrupted writes: %s", ", ".join(removed))

    async def sync_versions(self) -> None:
        """Mirror the registry (the source of truth) into the model_versions table."""
        for v in await asyncio.to_thread(self.registry.versions):
            await self.conversations.record_model_version(v.name, v.model_path, v.created_at, v.metrics,
                                                          v.note or v.kind)

    # ---- notifications and progress ---------------------------------------------------
    def add_notifier(self, platform: str, fn: Notifier) -> None:
        """`await fn(chat_id, Outgoing)` delivers a run's result to a chat of `platform`.

        When the asker was in a thread / forum topic, it is called as
        `fn(chat_id, Outgoing, thread_id=...)`; adapters with threads take that keyword."""
        if platform == "console" and self._console_default:
            self._notifiers["console"] = []
            self._console_default = False
        self._notifiers.setdefault(platform, []).append(fn)

    def add_progress_listener(self, fn: ProgressListener) -> None:
        self._listeners.append(fn)

    async def _print_notice(self, chat_id: str, out: Outgoing, thread_id: str = "") -> None:
        print(f"mynah> {out.text}" + (f"\n(loss curve: {out.image})" if out.image else ""), flush=True)

    async def notify(self, targets: list[tuple], out: Outgoing) -> None:
        """Send `out` to each (platform, chat_id[, thread_id]) through that platform's notifiers."""
        for platform, chat_id, *rest in targets:
            thread = rest[0] if rest else ""
            fns = self._notifiers.get(platform) or []
            if not fns:
                log.info("no %s notifier registered; result for chat %s:\n%s", platform, chat_id, out.text)
            for fn in fns:
                try:
                    if thread:
                        await fn(str(chat_id), out, thread_id=str(thread))
                    else:
                        await fn(str(chat_id), out)
                except Exception:
                    log.exception("could not tell %s chat %s about the run", platform, chat_id)

    def _progress(self, event: dict) -> None:
        run = self._run
        if run is not None:
            if event.get("event") == "stage":
                run.stage = event["stage"]
            elif event.get("event") == "train":
                run.stage = "training"
                run.step = int(event.get("step") or 0)
                run.total_steps = int(event.get("total_steps") or 0)
            elif event.get("event") == "started":
                run.pid = event.get("pid")
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("a progress listener failed")

    # ---- state --------------------------------------------------------------------------
    @property
    def running(self) -> _Run | None:
        run = self._run
        return run if run is not None and run.task is not None and not run.task.done() else None

    @property
    def serving(self) -> str | None:
        return self._serving

    def _scheduled_targets(self) -> list[tuple]:
        """[learning] notify: "telegram:123" or "discord:CHANNEL_ID" (optionally ":THREAD_ID")."""
        return [tuple(str(t).split(":", 2)) for t in self.lc.notify]

    async def new_messages(self) -> tuple[int, int]:
        """(user messages new since the active version or its last attempt, the watermark)."""
        active = await asyncio.to_thread(self.registry.active)
        watermark = active.trained_through if active else 0
        if active is not None:
            for run in await self.conversations.training_runs(20):
                data = run["data"]
                if run["status"] == "done" and data.get("base_version") == active.name and data.get("through"):
                    watermark = max(watermark, int(data["through"]))
                    break
        return await self.conversations.count_user_messages(after_message_id=watermark), watermark

    # ---- the schedule -----------------------------------------------------------------
    async def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        sched = parse_schedule(self.lc.schedule)
        scheduler = AsyncIOScheduler(job_defaults={"coalesce": True, "max_instances": 1,
                                                   "misfire_grace_time": int(self.lc.misfire_grace_seconds)})
        kwargs = {}
        if sched.interval_seconds is not None:
            trigger = IntervalTrigger(seconds=sched.interval_seconds)
            kwargs["next_run_time"] = await self._first_interval_fire(sched.interval_seconds)
        else:
            trigger = CronTrigger.from_crontab(sched.cron)
        scheduler.add_job(self._scheduled, trigger, id="mynah-retrain", name="scheduled retrain",
                          replace_existing=True, **kwargs)
        scheduler.start()
        self.scheduler = scheduler
        log.info("learning loop: scheduled %s; next run %s", self.lc.schedule, self.next_run_time())

    async def _first_interval_fire(self, interval: float) -> dt.datetime:
        """An in-memory interval job starts counting afresh with every start of the bot; so
        the last fire is kept in the registry (.schedule.json) and a fire that fell due while
        the bot was down happens shortly after startup instead of a whole interval later."""
        now = time.time()
        state = await asyncio.to_thread(self._schedule_state)
        last = state.get("last_fire")
        if last is None:
            await asyncio.to_thread(self._save_schedule_state, now)
            last = now
        return dt.datetime.fromtimestamp(max(now + min(interval, STARTUP_DELAY_S), last + interval), dt.timezone.utc)

    def _schedule_state(self) -> dict:
        try:
            return json.loads((self.registry.root / ".schedule.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _save_schedule_state(self, last_fire: float) -> None:
        with contextlib.suppress(OSError):
            self.registry.root.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.registry.root / ".schedule.json", {"last_fire": last_fire})

    def next_run_time(self) -> dt.datetime | None:
        if self.scheduler is None:
            return None
        job = self.scheduler.get_job("mynah-retrain")
        return job.next_run_time if job is not None else None

    async def _scheduled(self) -> None:
        """The job: start a run when enough is new; otherwise note why not. Never raises."""
        self.schedule_fires += 1
        try:
            await asyncio.to_thread(self._save_schedule_state, time.time())
            if self.running is not None:
                self.last_check = (time.time(), f"run #{self.running.run_id} was still running")
                return
            new, _ = await self.new_messages()
            if new < self.lc.min_new_messages:
                self.last_check = (time.time(), f"skipped: {new} new user messages, {self.lc.min_new_messages} needed")
                log.info("scheduled retrain %s", self.last_check[1])
                return
            run_id = await self.start_run("schedule", notify_to=self._scheduled_targets())
            self.last_check = (time.time(), f"started run #{run_id}")
        except AlreadyRunning as exc:
            self.last_check = (time.time(), f"{exc} (another process)")
        except Exception:
            log.exception("the scheduled retrain could not start")
            self.last_check = (time.time(), "error: could not start (see the log)")

    # ---- runs -----------------------------------------------------------------------
    async def start_run(self, trigger: str, *, force: bool = True,
                        notify_to: list[tuple] | None = None) -> int:
        """Take the lock, record the run, start it in the background; returns its id.

        Raises AlreadyRunning when another run (here or in another process) holds the lock."""
        async with self._start_lock:
            if self.running is not None:
                raise AlreadyRunning({"run_id": self.running.run_id})
            lock = self.registry.train_lock()
            if not await asyncio.to_thread(lock.acquire):
                raise AlreadyRunning(lock.holder())
            try:
                active = await asyncio.to_thread(self.registry.active)
                run_id = await self.conversations.start_training_run(
                    trigger, {"base_version": active.name if active else None})
                lock.describe({"pid": os.getpid(), "run_id": run_id, "since": time.time(), "trigger": trigger})
            except BaseException:
                lock.release()
                raise
            run = _Run(run_id, trigger, force, lock, list(notify_to or []))
            self._run = run
            run.task = asyncio.create_task(self._execute(run), name=f"mynah-retrain-{run_id}")
            return run_id

    async def run_once(self, trigger: str, *, force: bool = False,
                       notify_to: list[tuple] | None = None) -> RunResult | None:
        """One run, awaited (the CLI). Without force, returns None when too little is new."""
        if not force:
            new, _ = await self.new_messages()
            if new < self.lc.min_new_messages:
                self.last_check = (time.time(), f"skipped: {new} new user messages, {self.lc.min_new_messages} needed")
                return None
        await self.start_run(trigger, force=force, notify_to=notify_to)
        return await self._run.task

    async def wait(self) -> RunResult | None:
        """Wait for the run in flight (if any) and return its result."""
        run = self._run
        if run is None or run.task is None:
            return self.last_result
        return await asyncio.shield(run.task)

    async def _execute(self, run: _Run) -> RunResult:
        result: RunResult | None = None
        try:
            result = await self._train_and_decide(run)
        except asyncio.CancelledError:
            result = RunResult(run.run_id, "interrupted", "interrupted", "the bot stopped during the run",
                               duration_s=time.time() - run.started)
            await self._record(run, result)
            raise
        except (RunFailed, RegistryError, OSError, ValueError) as exc:
            result = RunResult(run.run_id, "failed", "failed", str(exc), duration_s=time.time() - run.started)
        except Exception as exc:
            log.exception("retrain run #%d failed", run.run_id)
            result = RunResult(run.run_id, "failed", "failed", f"{type(exc).__name__}: {exc}",
                               duration_s=time.time() - run.started)
        finally:
            if run.folder is not None:
                await asyncio.to_thread(_strip_run_folder, run.folder, keep_candidate=False)
            run.lock.release()
            if result is not None:
                self.last_result = result
        await self._record(run, result)
        log.info("%s", result.summary().replace("\n", " | "))
        self._progress({"event": "result", "run_id": run.run_id, "status": result.status,
                        "decision": result.decision, "reason": result.reason})
        if run.notify_to:
            await self.notify(run.notify_to, Outgoing(result.summary(), image=result.loss_curve))
        return result

    async def _record(self, run: _Run, result: RunResult) -> None:
        if result.decision == "promoted":
            decision = f"promoted {result.promoted}: {result.reason}"
        elif result.decision in ("rejected", "skipped"):
            decision = f"{result.decision}: {result.reason}"
        else:
            decision = result.decision
        try:
            await self.conversations.update_training_run(
                run.run_id, status=result.status, decision=decision, data=result.data or None,
                losses=result.losses or None, finished=True,
                error=result.reason if result.status in ("failed", "interrupted") else None)
        except Exception:
            log.exception("could not record run #%d", run.run_id)

    async def _train_and_decide(self, run: _Run) -> RunResult:
        lc = self.lc
        active = await asyncio.to_thread(self.registry.active)
        if active is None:
            raise RunFailed("the registry has no active version; start the bot once or run `mynah models`")
        folder = self.registry.runs_dir() / f"run-{run.run_id:04d}"
        run.folder = folder
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)

        # 1. room on disk for a candidate
        need_mb = 2 * folder_bytes(_local_model_folder(active)) / 2**20 + lc.min_free_disk_mb
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < need_mb:
            raise RunFailed(f"disk full: {free_mb:.0f} MB free in {self.registry.root}, a run needs {need_mb:.0f} MB "
                            "(the candidate model plus [learning] min_free_disk_mb)")

        # 2. the data
        run.stage = "exporting"
        self._progress({"event": "stage", "stage": "exporting dialogues", "run_id": run.run_id})
        plan = await self._export(run, active)
        data = plan["counts"]
        base = RunResult(run.run_id, "done", "", base_version=active.name, data=data)
        if plan["skip"]:
            base.status, base.decision, base.reason = "skipped", "skipped", plan["skip"]
            base.duration_s = time.time() - run.started
            return base
        await self.conversations.update_training_run(run.run_id, data=data)

        # 3. the child
        job = {
            "run_id": run.run_id, "init": _abs_model_path(active), "format": self.config.model.format,
            "device": self.config.model.device, "data": str((folder / "data.jsonl").resolve()),
            "forgotten": str((folder / "forgotten.json").resolve()),
            "output": str((folder / f"candidate-run-{run.run_id}").resolve()),
            "result": str((folder / "result.json").resolve()),
            "threads": lc.threads, "nice": lc.nice, "max_memory_mb": lc.max_memory_mb,
            "train": {"lr": lc.lr, "epochs": lc.epochs, "batch_size": lc.batch_size, "max_len": lc.max_len,
                      "max_minutes": lc.max_minutes, "valid_fraction": 0.1, "patience": 3, "seed": run.run_id},
        }
        await asyncio.to_thread(write_json_atomic, folder / "job.json", job)
        forgotten = await self.conversations.forgotten_message_ids()
        exported = plan["ids"]
        await asyncio.to_thread(write_json_atomic_list, folder / "forgotten.json", sorted(forgotten & exported))
        res = await self._run_child(run, folder)

        before, after = res.get("before") or {}, res.get("after") or {}
        base.losses = {"before": before, "after": after}
        base.data = {**data, "steps": (res.get("train") or {}).get("steps"),
                     "train_time_s": (res.get("train") or {}).get("train_time_s"),
                     "max_resident_mb": res.get("max_resident_mb"),
                     "dropped_forgotten": (res.get("counts") or {}).get("dropped_forgotten", 0)}
        candidate = Path(res.get("candidate") or job["output"])
        curve = Path(res.get("loss_curve") or candidate / "loss_curve.png")
        if curve.is_file():
            await asyncio.to_thread(shutil.copyfile, curve, folder / "loss_curve.png")
            base.loss_curve = folder / "loss_curve.png"
        with contextlib.suppress(OSError):
            shutil.copyfile(candidate / "metrics.json", folder / "metrics.json")

        # 4. the decision
        reason = self._judge(before, after, res.get("finite", False))
        if reason is None:
            reason = await self._changed_meanwhile(active, plan)
        if reason is not None:
            base.decision, base.reason = "rejected", reason
            base.duration_s = time.time() - run.started
            return base

        # 5. promotion: verified loadable, renamed into the registry, pointer, hot swap
        run.stage = "promoting"
        self._progress({"event": "stage", "stage": "promoting", "run_id": run.run_id})
        metrics = {"held_out_loss": after.get("held_out"), "held_out_loss_before": before.get("held_out"),
                   "base_loss": after.get("base"), "base_loss_before": before.get("base"),
                   "held_out_dialogues": data["held_out"], "base_eval_dialogues": data["base_eval"],
                   "base_corpus": lc.base_corpus, "train": res.get("train") or {}}
        async with self._swap_lock:
            loaded = None
            if self.engine is not None:
                try:
                    loaded = await asyncio.to_thread(self._load, str(candidate), "candidate")
                except Exception as exc:
                    base.decision, base.reason = "rejected", f"the candidate failed to load: {exc}"
                    base.duration_s = time.time() - run.started
                    return base
            if await asyncio.to_thread(self.registry.active_name) != active.name:
                base.decision = "rejected"
                base.reason = "the active version changed during the run (a rollback?); the candidate was dropped"
                base.duration_s = time.time() - run.started
                return base
            version = await asyncio.to_thread(
                self.registry.add_fine_tuned, candidate, parent=active.name, run_id=run.run_id,
                trained_through=plan["through"], metrics=metrics, note=f"run #{run.run_id} ({run.trigger})")
            self._stamp = self.registry.pointer_stamp()
            if loaded is not None:
                loaded.version = version.name
                self.engine.swap(loaded)
            self._serving = version.name
        await self.conversations.record_model_version(version.name, version.model_path, version.created_at,
                                                      version.metrics, version.note)
        if version.loss_curve is not None:
            base.loss_curve = version.loss_curve
        pruned = await asyncio.to_thread(self.registry.prune, lc.keep_versions)
        if pruned:
            log.info("pruned old versions: %s", ", ".join(pruned))
        base.decision, base.promoted = "promoted", version.name
        base.reason = (f"held-out loss fell by {before['held_out'] - after['held_out']:.4f} "
                       f"(margin {lc.promote_margin:g})")
        base.data["candidate"] = version.name
        base.duration_s = time.time() - run.started
        return base

    def _judge(self, before: dict, after: dict, finite: bool) -> str | None:
        """None when the candidate may be promoted, else why not."""
        import math

        values = [before.get("held_out"), after.get("held_out")]
        if not finite or any(v is None or not math.isfinite(v) for v in values):
            return "the candidate produced NaN or infinite values"
        gain = before["held_out"] - after["held_out"]
        if gain < self.lc.promote_margin:
            return (f"held-out loss {before['held_out']:.4f} → {after['held_out']:.4f} is not better by the "
                    f"margin {self.lc.promote_margin:g}")
        if before.get("base") is not None and after.get("base") is not None:
            if not math.isfinite(after["base"]):
                return "the candidate produced NaN or infinite values on the base corpus"
            rise = after["base"] - before["base"]
            if rise > self.lc.base_loss_tolerance:
                return (f"base-corpus loss rose {before['base']:.4f} → {after['base']:.4f} (+{rise:.4f}), "
                        f"more than the tolerance {self.lc.base_loss_tolerance:g}: it would forget too much")
        return None

    async def _changed_meanwhile(self, active: Version, plan: dict) -> str | None:
        """Privacy: a /forget or /optout that came after the export vetoes the candidate."""
        forgotten = await self.conversations.forgotten_message_ids()
        if forgotten & plan["ids"]:
            return "some exported messages were deleted by /forget during the run; the candidate was dropped"
        chats = plan["chats"]
        if chats and await self.conversations.consenting_chats(chats) != chats:
            return "a chat in the training data ran /optout during the run; the candidate was dropped"
        return None

    def _load(self, path: str, version: str):
        from engine.model import load_model

        return load_model(path, fmt=self.config.model.format, device=self.config.model.device, version=version,
                          quantize=self.config.engine.quantize)

    # ---- export --------------------------------------------------------------------
    async def _export(self, run: _Run, active: Version) -> dict:
        """Write data.jsonl (train / held_out / base_eval) and return counts and ids."""
        lc = self.lc
        watermark = active.trained_through
        snapshot = await self.conversations.max_message_id()
        forgotten = await self.conversations.forgotten_message_ids()
        new = [d for d in await self.conversations.export_dialogues(after_message_id=watermark)
               if not forgotten.intersection(d.message_ids)]
        old = []
        if lc.replay_fraction > 0 and watermark > 0:
            old = [d for d in await self.conversations.export_dialogues()
                   if d.last_message_id <= watermark and not forgotten.intersection(d.message_ids)]
        through = max([snapshot] + [d.last_message_id for d in new])
        counts = {"base_version": active.name, "after": watermark, "through": through, "new_dialogues": len(new),
                  "new_user_messages": await self.conversations.count_user_messages(after_message_id=watermark)}
        n_held = max(1, round(len(new) * lc.held_out_fraction))
        if len(new) < 2:
            return {"skip": f"only {len(new)} new dialogue(s) since {active.name}; at least 2 are needed "
                            "(one to train on, one to hold out)", "counts": counts, "ids": set(), "chats": set(),
                    "through": through}
        n_held = min(n_held, len(new) - 1)
        held_out, new_train = new[-n_held:], new[:-n_held]
        rng = random.Random(run.run_id)
        replay_old = rng.sample(old, min(len(old), round(lc.replay_fraction * len(new_train))))
        base_eval, base_pool = await asyncio.to_thread(self._base_corpus)
        replay_base = rng.sample(base_pool, min(len(base_pool), round(lc.base_replay_fraction * len(new_train))))
        counts.update({"train_new": len(new_train), "held_out": len(held_out), "replay_old": len(replay_old),
                       "replay_base": len(replay_base), "base_eval": len(base_eval)})
        rows = ([{"split": "train", "turns": d.turns, "ids": d.message_ids} for d in new_train + replay_old]
                + [{"split": "train", "turns": t, "ids": []} for t in replay_base]
                + [{"split": "held_out", "turns": d.turns, "ids": d.message_ids} for d in held_out]
                + [{"split": "base_eval", "turns": t, "ids": []} for t in base_eval])
        rng.shuffle(rows)  # the child keeps the split labels; order within a split does not matter
        await asyncio.to_thread(_write_jsonl, run.folder / "data.jsonl", rows)
        logged = new_train + replay_old + held_out
        return {"skip": "", "counts": counts, "through": through,
                "ids": {i for d in logged for i in d.message_ids}, "chats": {d.chat_id for d in logged}}

    def _base_corpus(self) -> tuple[list[list[str]], list[list[str]]]:
        """(the fixed evaluation sample, the rest for replay) of [learning] base_corpus."""
        spec = self.lc.base_corpus
        if not spec:
            return [], []
        if self._base_cache is None or self._base_cache[0] != spec:
            from engine.training.data import read_corpus

            dialogues = list(read_corpus(spec))
            random.Random(BASE_SAMPLE_SEED).shuffle(dialogues)
            self._base_cache = (spec, dialogues)
        dialogues = self._base_cache[1]
        n = min(self.lc.base_eval_dialogues, len(dialogues))
        return dialogues[:n], dialogues[n:]

    # ---- the child process --------------------------------------------------------------
    async def _run_child(self, run: _Run, folder: Path) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH", "")) if p)
        if self.lc.threads > 0:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.lc.threads)
        run.stage = "starting the trainer"
        with open(folder / "trainer.log", "ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.training.finetune", str((folder / "job.json").resolve()),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=env, start_new_session=True, limit=2**22)
        run.pid = proc.pid
        last: dict = {}
        timeout = self.lc.max_minutes * 60 * 2 + 1800 if self.lc.max_minutes > 0 else None

        async def pump() -> None:
            nonlocal last
            async for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                event["run_id"] = run.run_id
                if event.get("event") == "finished":
                    last = event
                self._progress(event)
            await proc.wait()

        try:
            await asyncio.wait_for(pump(), timeout)
        except asyncio.TimeoutError:
            await _stop_process(proc)
            raise RunFailed(f"the trainer ran past its time limit ({timeout / 60:.0f} min) and was stopped")
        except BaseException:
            await _stop_process(proc)
            raise
        result = None
        with contextlib.suppress(OSError, ValueError):
            result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        result = result or last or None
        if proc.returncode != 0 or not result or not result.get("ok"):
            raise RunFailed(self._child_failure(proc.returncode, result, folder))
        return result

    @staticmethod
    def _child_failure(code: int | None, result: dict | None, folder: Path) -> str:
        if result and result.get("error"):
            return f"the trainer failed: {result['error']}"
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (out of memory? the kernel's OOM killer uses SIGKILL)" if -code == signal.SIGKILL else ""
            return f"the trainer was killed by {name}{hint}"
        tail = ""
        with contextlib.suppress(OSError):
            lines = (folder / "trainer.log").read_text(encoding="utf-8", errors="replace").strip().splitlines()
            tail = lines[-1] if lines else ""
        if "MemoryError" in tail or "allocate memory" in tail:
            return f"the trainer ran out of memory ([learning] max_memory_mb): {tail}"
        if "No space left on device" in tail:
            return f"disk full: {tail}"
        return f"the trainer exited with status {code}" + (f": {tail}" if tail else "")

    # ---- the active pointer: rollback, and noticing changes made elsewhere -----------------
    async def _poll_pointer(self) -> None:
        while True:
            await asyncio.sleep(self.lc.poll_seconds)
            try:
                await self.check_pointer()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking the active model pointer failed")

    async def check_pointer(self) -> bool:
        """Serve what the pointer names, if it changed (e.g. `mynah rollback`). True if swapped."""
        stamp = await asyncio.to_thread(self.registry.pointer_stamp)
        if stamp == self._stamp:
            return False
        async with self._swap_lock:
            self._stamp = stamp
            version = await asyncio.to_thread(self.registry.active)
            if version is None or version.name == self._serving or self.engine is None:
                return False
            try:
                loaded = await asyncio.to_thread(self._load, version.model_path, version.name)
            except Exception as exc:
                log.error("the active pointer now names %s, but it does not load (%s); still serving %s",
                          version.name, exc, self._serving)
                return False
            self.engine.swap(loaded)
            log.info("the active pointer changed: now serving %s (was %s)", version.name, self._serving)
            self._serving = version.name
            return True

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        """Make `target` (default: the previous version) active now and serve it."""
        async with self._swap_lock:
            name = parse_version(target) if target else await asyncio.to_thread(self.registry.previous)
            if name is None:
                raise RegistryError("there is no previous version to roll back to")
            version = await asyncio.to_thread(self.registry.get, name)
            loaded = None
            if self.engine is not None:
                try:
                    loaded = await asyncio.to_thread(self._load, version.model_path, version.name)
                except Exception as exc:
                    raise RegistryError(f"{version.name} does not load ({exc}); still serving {self._serving}") from exc
            version, old = await asyncio.to_thread(self.registry.rollback, version.name,
                                                   f"rollback by {who}" if who else "")
            self._stamp = self.registry.pointer_stamp()
            if loaded is not None:
                self.engine.swap(loaded)
            self._serving = version.name
            return version, old

    # ---- admin commands (after bots/chat/admin.py's ACL and audit) -----------------------------
    async def command_retrain(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        who = f"{msg.platform}:{msg.user_id}" + (f" ({msg.user_name})" if msg.user_name else "")
        try:
            run_id = await self.start_run(who, force=True,
                                          notify_to=[(msg.platform, str(msg.chat_id), msg.thread_id or "")])
        except AlreadyRunning as exc:
            since = exc.holder.get("since")
            ago = f", started {_duration(time.time() - since)} ago" if since else ""
            return [Outgoing(f"Not started: {exc}{ago}. /status shows its progress.", ephemeral=True)]
        return [Outgoing(f"Retrain started: run #{run_id}. I'll post the result here when it ends "
                         f"(training is capped at {self.lc.max_minutes:g} min, evaluation comes on top).",
                         ephemeral=True)]

    async def command_rollback(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        who = f"{msg.platform}:{msg.user_id}"
        try:
            version, old = await self.rollback(args[0] if args else None, who=who)
        except RegistryError as exc:
            return [Outgoing(f"Rollback failed: {exc}", ephemeral=True)]
        await self.sync_versions()
        text = f"Rolled back: now serving {version.name} (was {old})."
        if self.running is not None:
            text += (f" Run #{self.running.run_id} is still training from {old}; its candidate will not be "
                     "promoted.")
        return [Outgoing(text, ephemeral=True)]

    async def command_models(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return [Outgoing(await self.models_text(), ephemeral=True)]

    async def models_text(self, limit: int = 15) -> str:
        versions = await asyncio.to_thread(self.registry.versions)
        if not versions:
            return "No model versions yet."
        active = await asyncio.to_thread(self.registry.active_name)
        replies = await self.conversations.replies_by_version()
        lines = [f"Model versions ({len(versions)}, newest first; * = active):"]
        for v in reversed(versions[-limit:]):
            lines.append(describe_version(v, active, replies.get(v.name)))
        if len(versions) > limit:
            lines.append(f"… and {len(versions) - limit} older")
        return "\n".join(lines)

    async def status_lines(self) -> list[str]:
        lines = []
        active = await asyncio.to_thread(self.registry.active)
        if active is not None:
            m = active.metrics
            if m.get("held_out_loss") is not None:
                lines.append(f"Active version: {active.name}, held-out loss {m['held_out_loss']:.4f} "
                             f"(was {m['held_out_loss_before']:.4f} on {m.get('held_out_dialogues', '?')} dialogues)"
                             + (f", base loss {m['base_loss']:.4f}" if m.get("base_loss") is not None else ""))
            else:
                lines.append(f"Active version: {active.name} ({active.kind}: {active.source or active.parent}); "
                             "held-out loss: not measured yet")
            if self._serving and self._serving != active.name:
                lines.append(f"Serving {self._serving} (switching to {active.name})")
        new, _ = await self.new_messages()
        lines.append(f"New since the active version: {new} user messages "
                     f"(a scheduled run needs {self.lc.min_new_messages})")
        nxt = self.next_run_time()
        if nxt is not None:
            wait = nxt.timestamp() - time.time()
            lines.append(f"Next scheduled run: {nxt.strftime('%Y-%m-%d %H:%M %Z').strip()} "
                         f"(in {_duration(max(0.0, wait))}; schedule {self.lc.schedule})")
        else:
            lines.append("Next scheduled run: none (the schedule is off)")
        if self.last_check is not None:
            lines.append(f"Last scheduled check: {_ago(self.last_check[0])}, {self.last_check[1]}")
        run = self.running
        if run is not None:
            step = f", step {run.step}/{run.total_steps}" if run.total_steps else ""
            lines.append(f"Running now: run #{run.run_id} ({run.trigger}): {run.stage}{step}, "
                         f"{_duration(time.time() - run.started)} so far")
        else:
            holder = await asyncio.to_thread(self.registry.train_lock().holder)
            if holder:
                lines.append(f"Running now in another process: run #{holder.get('run_id', '?')} "
                             f"(pid {holder.get('pid', '?')})")
        runs = await self.conversations.training_runs(3)
        if runs:
            lines.append("Last runs:")
            lines += [f"  {describe_run(r)}" for r in runs]
        return lines


def describe_version(v: Version, active: str | None, replies: int | None = None) -> str:
    mark = "*" if v.name == active else " "
    when = dt.datetime.fromtimestamp(v.created_at).strftime("%Y-%m-%d %H:%M") if v.created_at else "?"
    if v.kind == "configured":
        what = f"configured model {v.source}"
    else:
        what = f"fine-tuned from {v.parent} by run #{v.run_id}"
    m = v.metrics
    nums = ""
    if m.get("held_out_loss") is not None:
        nums = f"; held-out {m['held_out_loss_before']:.4f} → {m['held_out_loss']:.4f}"
        if m.get("base_loss") is not None:
            nums += f", base {m['base_loss_before']:.4f} → {m['base_loss']:.4f}"
    used = f"; {replies} replies" if replies else ""
    return f"{mark} {v.name}  {when}  {what}{nums}{used}"


def describe_run(r: dict) -> str:
    dur = _duration(r["duration_s"]) if r.get("duration_s") is not None else "running"
    what = r.get("decision") or r["status"]
    if r["status"] in ("failed", "interrupted") and r.get("error"):
        what = f"{r['status']}: {r['error']}"
    losses = r.get("losses") or {}
    b, a = (losses.get("before") or {}).get("held_out"), (losses.get("after") or {}).get("held_out")
    nums = f" [held-out {b:.3f} → {a:.3f}]" if b is not None and a is not None else ""
    when = dt.datetime.fromtimestamp(r["started_at"]).strftime("%m-%d %H:%M")
    return f"#{r['id']} {when} {r['trigger']}, {dur}: {_short(what, 160)}{nums}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _ago(timestamp: float) -> str:
    return f"{_duration(time.time() - timestamp)} ago"


def _local_model_folder(version: Version) -> str:
    from engine.model import resolve_path

    try:
        return resolve_path(version.model_path)
    except Exception:
        return version.model_path


def _abs_model_path(version: Version) -> str:
    """What the child loads: absolute for folders (it may run elsewhere), as is for hub names."""
    path = _local_model_folder(version)
    return str(Path(path).resolve()) if Path(path).exists() else path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json_atomic_list(path: Path, items: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(items), encoding="utf-8")
    os.replace(tmp, path)


def _strip_run_folder(folder: Path, keep_candidate: bool = False) -> None:
    """Delete the exported text and the candidate weights; keep the log, job, result, curve."""
    for name in ("data.jsonl", "data.jsonl.tmp", "forgotten.json", "forgotten.json.tmp"):
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    if not keep_candidate:
        for path in folder.glob("candidate*"):
            shutil.rmtree(path, ignore_errors=True)


async def _stop_process(proc) -> None:
    """SIGTERM the trainer, SIGKILL it if it lingers."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
