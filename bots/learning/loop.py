"""The learning loop: scheduled and on-demand fine-tuning on the logged conversations.

One run, start to end (``Learning.run_once`` / ``start_run``, then ``_steps``):

1. take the training lock (an flock in the registry: one run at a time, across processes,
   and the OS drops it if the holder dies), and check there is room on disk for a candidate;
2. export from SQLite what is new since the active version (opted-in chats only; forgotten
   messages are gone from the table and filtered again by id), plus a replay sample of
   older logs and of the base corpus; the newest slice of the new dialogues is held out
   (export.py);
3. fine-tune the active model in a child process (``python -m engine.training.finetune``: nice,
   few threads, bounded memory), which also scores the active model and the candidate on
   the same held-out dialogues and the same fixed base-corpus sample (trainer.py);
4. promote only when the held-out loss fell by ``promote_margin`` and the base loss rose by
   no more than ``base_loss_tolerance`` (and nothing is NaN: decide.py), no exported message
   was forgotten or opted out meanwhile (export.py), the candidate loads and the active
   version did not change meanwhile (promote.py); promotion renames the candidate into the
   registry, replaces the pointer atomically and hot-swaps the engine between batches;
5. record the run (training_runs), clean up the exported text, tell whoever asked (the
   texts: report.py).

The scheduler is an APScheduler AsyncIOScheduler job in the bot's event loop (schedule.py);
admin commands (/retrain, /rollback, /models, /status lines) come through bots/chat/admin.py,
after its ACL. Adapters register `add_notifier(platform, async fn(chat_id, Outgoing))` so a
run's result (numbers + loss-curve picture) reaches the chat that asked for it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from bots.chat.events import Incoming, Outgoing
from bots.learning import report
from bots.learning.decide import Decision, Verdict, decide, parrot
from bots.learning.export import (BaseCorpus, ExportPlan, changed_since_export, export_dialogues, strip_run_folder,
                                  tidy_run_folders)
from bots.learning.notify import Notifier, Notifiers, ProgressListener
from bots.learning.promote import Promoter, PromotionRefused
from bots.learning.report import RunResult, RunStatus
from bots.learning.schedule import ScheduleState, next_run_time, parse_schedule, start_scheduler
from bots.learning.quiet import engine_yields_cores
from bots.learning.trust import Trust, approval_text
from bots.learning.trainer import (RunFailed, TrainerResult, build_job, check_disk, keep_training_record, run_trainer,
                                   write_job)
from engine.registry import FileLock, Registry, RegistryError, Version, clean_stale, parse_version, prune

log = logging.getLogger(__name__)

KEEP_RUN_FOLDERS = 30


class AlreadyRunning(RuntimeError):
    """Another run holds the training lock."""

    def __init__(self, holder: dict | None):
        self.holder = holder or {}
        run = self.holder.get("run_id")
        super().__init__(f"a retrain is already running{f' (run #{run})' if run else ''}")


@dataclass
class RunState:
    """The run in flight, as /status shows it."""
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

    def __init__(self, config, registry: Registry, store, engine=None, *, serving: str | None = None):
        self.config = config
        self.lc = config.learning
        self.registry = registry
        self.store = store      # storage.store.Store
        self.engine = engine
        self.promoter = Promoter(config, registry, engine, serving=serving)
        self._notifiers = Notifiers()
        self._run: RunState | None = None
        self._start_lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._base_corpus = BaseCorpus()
        self._schedule_state = ScheduleState(registry.root)
        self.scheduler = None
        self.schedule_fires = 0
        self.last_check: tuple[float, str] | None = None
        self.last_result: RunResult | None = None
        self.trust = Trust(self)
        self.canary = None  # canary.Canary (set by the app): with canary_share, step 4 serves some chats first
        self.train_lock = registry.train_lock   # several workers: also a database lease (bots/cluster.py)

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self, *, schedule: bool | None = None) -> None:
        """Tidy what a crash left, mirror the versions into SQLite, start the job and the poller."""
        await self.recover()
        await self.sync_versions()
        await self.promoter.start()
        if schedule if schedule is not None else self.lc.enabled:
            await self._start_scheduler()
        if self.engine is not None and self._poller is None:
            self._poller = asyncio.create_task(self.promoter.poll(), name="mynah-learning-poll")

    async def stop(self) -> None:
        """Stop the job and the poller; a run in flight is stopped (its trainer killed) and recorded."""
        await self.trust.stop()
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
        lock = self.train_lock()
        if not await asyncio.to_thread(lock.acquire):
            return  # a run is going on in another process: leave its files alone
        try:
            ids = await self.store.runs.interrupt_running_runs(
                "interrupted: the process running it stopped (crash, kill or shutdown)")
            if ids:
                log.warning("training run(s) %s were interrupted by a stop; marked as such", ids)
            await asyncio.to_thread(self._clean_files)
        finally:
            lock.release()

    def _clean_files(self) -> None:
        removed = clean_stale(self.registry)
        tidy_run_folders(self.registry.runs_dir(), KEEP_RUN_FOLDERS)
        if removed:
            log.info("removed leftovers from interrupted writes: %s", ", ".join(removed))

    async def sync_versions(self) -> None:
        """Mirror the registry (the source of truth) into the model_versions table."""
        for v in await asyncio.to_thread(self.registry.versions):
            await self.store.runs.record_model_version(v.name, v.model_path, v.created_at, v.metrics,
                                                          v.note or v.kind)

    # ---- notifications and progress ---------------------------------------------------
    def add_notifier(self, platform: str, fn: Notifier) -> None:
        """`await fn(chat_id, Outgoing)` delivers a run's result to a chat of `platform`.

        When the asker was in a thread / forum topic, it is called as
        `fn(chat_id, Outgoing, thread_id=...)`; adapters with threads take that keyword."""
        self._notifiers.add(platform, fn)

    def add_progress_listener(self, fn: ProgressListener) -> None:
        self._notifiers.add_listener(fn)

    async def notify(self, targets: list[tuple], out: Outgoing) -> None:
        """Send `out` to each (platform, chat_id[, thread_id]) through that platform's notifiers."""
        await self._notifiers.notify(targets, out)

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
        self._notifiers.progress(event)

    # ---- state --------------------------------------------------------------------------
    @property
    def running(self) -> RunState | None:
        run = self._run
        return run if run is not None and run.task is not None and not run.task.done() else None

    @property
    def serving(self) -> str | None:
        return self.promoter.serving

    def _scheduled_targets(self) -> list[tuple]:
        """[learning] notify: "telegram:123" or "discord:CHANNEL_ID" (optionally ":THREAD_ID")."""
        return [tuple(str(t).split(":", 2)) for t in self.lc.notify]

    async def new_messages(self) -> tuple[int, int]:
        """(user messages new since the active version or its last attempt, the watermark)."""
        active = await asyncio.to_thread(self.registry.active)
        watermark = active.trained_through if active else 0
        if active is not None:
            for run in await self.store.runs.training_runs(20):
                data = run["data"]
                if run["status"] == RunStatus.DONE and data.get("base_version") == active.name and data.get("through"):
                    watermark = max(watermark, int(data["through"]))
                    break
        return await self.trust.store.count_new_user_messages(after_message_id=watermark), watermark

    # ---- the schedule -----------------------------------------------------------------
    async def _start_scheduler(self) -> None:
        sched = parse_schedule(self.lc.schedule)
        first = None
        if sched.interval_seconds is not None:
            first = await asyncio.to_thread(self._schedule_state.first_fire, sched.interval_seconds)
        self.scheduler = start_scheduler(sched, self._scheduled, misfire_grace_seconds=self.lc.misfire_grace_seconds,
                                         first_fire=first)
        log.info("learning loop: scheduled %s; next run %s", self.lc.schedule, self.next_run_time())

    def next_run_time(self):
        """When the scheduled job fires next (a datetime), or None when the schedule is off."""
        return next_run_time(self.scheduler)

    def _skip_note(self, new: int) -> str:
        return f"skipped: {new} new user messages, {self.lc.min_new_messages} needed"

    async def _scheduled(self) -> None:
        """The job: start a run when enough is new; otherwise note why not. Never raises."""
        self.schedule_fires += 1
        try:
            await asyncio.to_thread(self._schedule_state.save, time.time())
            if self.running is not None:
                self.last_check = (time.time(), f"run #{self.running.run_id} was still running")
                return
            new, _ = await self.new_messages()
            if new < self.lc.min_new_messages:
                self.last_check = (time.time(), self._skip_note(new))
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
            lock = self.train_lock()
            if not await asyncio.to_thread(lock.acquire):
                raise AlreadyRunning(lock.holder())
            try:
                active = await asyncio.to_thread(self.registry.active)
                run_id = await self.store.runs.start_training_run(
                    trigger, {"base_version": active.name if active else None})
                lock.describe({"pid": os.getpid(), "run_id": run_id, "since": time.time(), "trigger": trigger})
            except BaseException:
                lock.release()
                raise
            run = RunState(run_id, trigger, force, lock, list(notify_to or []))
            self._run = run
            run.task = asyncio.create_task(self._execute(run), name=f"mynah-retrain-{run_id}")
            return run_id

    async def run_once(self, trigger: str, *, force: bool = False,
                       notify_to: list[tuple] | None = None) -> RunResult | None:
        """One run, awaited (the CLI). Without force, returns None when too little is new."""
        if not force:
            new, _ = await self.new_messages()
            if new < self.lc.min_new_messages:
                self.last_check = (time.time(), self._skip_note(new))
                return None
        await self.start_run(trigger, force=force, notify_to=notify_to)
        return await self._run.task

    async def wait(self) -> RunResult | None:
        """Wait for the run in flight (if any) and return its result."""
        run = self._run
        if run is None or run.task is None:
            return self.last_result
        return await asyncio.shield(run.task)

    async def _execute(self, run: RunState) -> RunResult:
        """Run the steps, turn whatever ends them into a result, then record and tell."""
        result: RunResult | None = None

        def ended(status: RunStatus, reason: str) -> RunResult:
            return RunResult(run.run_id, status, Decision(status.value), reason, duration_s=time.time() - run.started)

        try:
            result = await self._steps(run)
            result.duration_s = time.time() - run.started
        except asyncio.CancelledError:
            result = ended(RunStatus.INTERRUPTED, "the bot stopped during the run")
            await self._record(run, result)
            raise
        except (RunFailed, RegistryError, OSError, ValueError) as exc:
            result = ended(RunStatus.FAILED, str(exc))
        except Exception as exc:
            log.exception("retrain run #%d failed", run.run_id)
            result = ended(RunStatus.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            if run.folder is not None:
                await asyncio.to_thread(strip_run_folder, run.folder, keep_candidate=False)
            run.lock.release()
            if result is not None:
                self.last_result = result
        await self._record(run, result)
        log.info("%s", result.summary().replace("\n", " | "))
        self._progress({"event": "result", "run_id": run.run_id, "status": result.status.value,
                        "decision": result.decision.value, "reason": result.reason})
        if run.notify_to:
            await self.notify(run.notify_to, Outgoing(result.summary(), image=result.loss_curve))
        return result

    async def _record(self, run: RunState, result: RunResult) -> None:
        try:
            await self.store.runs.update_training_run(
                run.run_id, status=result.status.value, decision=result.decision_text(), data=result.data or None,
                losses=result.losses or None, finished=True,
                error=result.reason if result.status in (RunStatus.FAILED, RunStatus.INTERRUPTED) else None)
        except Exception:
            log.exception("could not record run #%d", run.run_id)

    # ---- the run's steps, in order ---------------------------------------------------------
    async def _steps(self, run: RunState) -> RunResult:
        """Disk → export → train in the child → decide → promote. A step that cannot go on
        raises (RunFailed …) or ends the result early (skipped, rejected)."""
        active = await asyncio.to_thread(self.registry.active)
        if active is None:
            raise RunFailed("the registry has no active version; start the bot once or run `mynah models`")
        run.folder = self.registry.runs_dir() / f"run-{run.run_id:04d}"
        await asyncio.to_thread(run.folder.mkdir, parents=True, exist_ok=True)
        check_disk(self.config, self.registry.root, active, run.folder)           # 1. room for a candidate
        plan = await self._export(run, active)                                 # 2. the data
        result = RunResult(run.run_id, RunStatus.DONE, Decision.SKIPPED, plan.skip, base_version=active.name,
                           data=plan.counts)
        if plan.skip:
            result.status = RunStatus.SKIPPED
            return result
        await self.store.runs.update_training_run(run.run_id, data=plan.counts)
        trained = await self._train(run, active, plan)                         # 3. the child
        await asyncio.to_thread(keep_training_record, result, trained, run.folder)
        verdict = await self._decide(trained, plan)                            # 4. the decision
        result.decision, result.reason = verdict.decision, verdict.reason
        if verdict.promoted:
            await self._promote(run, active, plan, trained, result)            # 5. promotion
        return result

    async def _export(self, run: RunState, active: Version) -> ExportPlan:
        run.stage = "exporting"
        self._progress({"event": "stage", "stage": "exporting dialogues", "run_id": run.run_id})
        return await export_dialogues(self.store, self.lc, active, run.run_id, run.folder, self._base_corpus,
                                      banned_words=list(self.config.generation.banned_words))

    async def _train(self, run: RunState, active: Version, plan: ExportPlan) -> TrainerResult:
        job = build_job(self.config, run.run_id, active, run.folder)
        forgotten = await self.store.messages.forgotten_message_ids()
        await asyncio.to_thread(write_job, run.folder, job, forgotten & plan.ids)
        run.stage = "starting the trainer"
        with engine_yields_cores(self.engine, self.config.engine, self.lc) as quiet:  # chats stay fast meanwhile
            return await run_trainer(job, run.folder, threads=self.lc.threads, max_minutes=self.lc.max_minutes,
                                     on_event=self._progress, on_started=lambda pid: (setattr(run, "pid", pid),
                                                                                      quiet.started(pid)))

    async def _decide(self, trained: TrainerResult, plan: ExportPlan) -> Verdict:
        verdict = decide(trained.before, trained.after, trained.finite, margin=self.lc.promote_margin,
                         tolerance=self.lc.base_loss_tolerance)
        if verdict.promoted:
            verdict = parrot(trained.probe_replies("candidate"), trained.probe_replies("active"), plan.user_texts,
                             n=self.lc.parrot_ngram, ratio=self.lc.parrot_ratio) or verdict
        if verdict.promoted:
            veto = await changed_since_export(self.store, plan)
            if veto is not None:
                return Verdict(Decision.REJECTED, veto)
        return verdict

    async def _promote(self, run: RunState, active: Version, plan: ExportPlan, trained: TrainerResult,
                       result: RunResult) -> None:
        """Verified loadable, renamed into the registry, pointer, hot swap; recorded; old versions pruned."""
        run.stage = "promoting"
        self._progress({"event": "stage", "stage": "promoting", "run_id": run.run_id})
        before, after, data = trained.before, trained.after, plan.counts
        metrics = {"held_out_loss": after.get("held_out"), "held_out_loss_before": before.get("held_out"),
                   "base_loss": after.get("base"), "base_loss_before": before.get("base"),
                   "held_out_dialogues": data["held_out"], "base_eval_dialogues": data["base_eval"],
                   "base_corpus": self.lc.base_corpus, "train": trained.train,
                   "awaiting_approval": self.lc.require_approval}
        if self.canary is not None and self.canary.enabled and not self.lc.require_approval:
            await self.canary.begin(run, active, plan.through, metrics, trained.candidate, result)
            if result.data.get("candidate"):           # its lineage, so /forget can retire it too
                await self.trust.record(result.data["candidate"], plan)
            return
        try:
            version = await self.promoter.promote(trained.candidate, active=active, run_id=run.run_id,
                                                  trigger=run.trigger, through=plan.through, metrics=metrics,
                                                  activate=not self.lc.require_approval)
        except PromotionRefused as exc:
            result.decision, result.reason = Decision.REJECTED, str(exc)
            return
        await self.trust.record(version.name, plan)
        await self.store.runs.record_model_version(version.name, version.model_path, version.created_at,
                                                      version.metrics, version.note)
        if version.loss_curve is not None:
            result.loss_curve = version.loss_curve
        pruned = await asyncio.to_thread(prune, self.registry, self.lc.keep_versions)
        if pruned:
            log.info("pruned old versions: %s", ", ".join(pruned))
        result.data["candidate"] = version.name
        if self.lc.require_approval:
            result.decision, result.reason = Decision.REJECTED, f"awaiting approval: /promote {version.name}"
            targets = run.notify_to or self._scheduled_targets()
            await self.notify(targets, Outgoing(approval_text(version.name, result, trained.probes)))
            return
        result.promoted = version.name

    # ---- the active pointer: rollback, and noticing changes made elsewhere -----------------
    async def check_pointer(self) -> bool:
        """Serve what the pointer names, if it changed (e.g. `mynah rollback`). True if swapped."""
        return await self.promoter.check_pointer()

    async def rollback(self, target: str | None = None, *, who: str = "") -> tuple[Version, str | None]:
        """Make `target` (default: the previous version) active now and serve it; never a
        version /forget retired."""
        name = parse_version(target) if target else await asyncio.to_thread(self.registry.previous)
        if name is not None and name in await self.trust.store.tainted():
            raise RegistryError(f"{name} was trained on forgotten data and can never be served")
        return await self.promoter.rollback(target, who=who)

    # ---- admin commands (after bots/chat/admin.py's ACL and audit) -----------------------------
    async def command_retrain(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        who = f"{msg.platform}:{msg.user_id}" + (f" ({msg.user_name})" if msg.user_name else "")
        privately = msg.platform == "telegram" and not msg.is_private   # admin output: to the admin's private chat
        target = (msg.platform, str(msg.user_id), "") if privately else (msg.platform, str(msg.chat_id), msg.thread_id)
        try:
            run_id = await self.start_run(who, force=True, notify_to=[target])
        except AlreadyRunning as exc:
            since = exc.holder.get("since")
            ago = f", started {report.duration(time.time() - since)} ago" if since else ""
            return [Outgoing(f"Not started: {exc}{ago}. /status shows its progress.", ephemeral=True)]
        where = "to you privately" if privately else "here"
        return [Outgoing(f"Retrain started: run #{run_id}. I'll post the result {where} when it ends "
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
            return report.NO_VERSIONS
        active = await asyncio.to_thread(self.registry.active_name)
        return report.models_text(versions, active, await self.store.messages.replies_by_version(), limit,
                                  await self.trust.store.lineage(), await self.trust.store.tainted())

    async def status_lines(self) -> list[str]:
        """The learning loop's part of /status."""
        return await report.status_lines(self)
