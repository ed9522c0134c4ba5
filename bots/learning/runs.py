"""One retrain run, start to end: lock, export, train in the child, decide, promote, record, tell.

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
   version did not change meanwhile (promote.py); with a canary (canary.py) the candidate
   first serves a share of chats instead;
5. record the run (training_runs), clean up the exported text, tell whoever asked (report.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bots.chat.events import Outgoing
from bots.learning.decide import Decision, Verdict, decide, parrot
from bots.learning.export import (BaseCorpus, ExportPlan, changed_since_export, export_dialogues, strip_run_folder,
                                  tidy_run_folders)
from bots.learning.notify import Notifiers, configured_targets
from bots.learning.promote import Promoter, PromotionRefused
from bots.learning.quiet import engine_yields_cores
from bots.learning.report import RunResult, RunStatus, approval_text
from bots.learning.trainer import (RunFailed, TrainerResult, build_job, check_disk, keep_training_record, run_trainer,
                                   write_job)
from engine.registry import FileLock, Registry, RegistryError, Version, clean_stale, prune
from engine.training.events import Event, RunEnded, Stage, Started, Train
from storage.trust import TrustStore

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

    def follow(self, event: Event) -> None:
        """What /status shows of the run, from the trainer's events."""
        if isinstance(event, Stage):
            self.stage = event.stage
        elif isinstance(event, Train):
            self.stage, self.step, self.total_steps = "training", event.step, event.total_steps
        elif isinstance(event, Started):
            self.pid = event.pid


class Runs:
    """Starts and executes runs; everything it needs is handed in (the canary is optional)."""

    def __init__(self, config, registry: Registry, store, lineage: TrustStore, promoter: Promoter,
                 notifiers: Notifiers, *, engine=None, canary=None):
        self.config, self.lc, self.engine = config, config.learning, engine
        self.registry, self.store, self.lineage = registry, store, lineage
        self.promoter, self.notifiers, self.canary = promoter, notifiers, canary
        self.current: RunState | None = None
        self.last_result: RunResult | None = None
        self._start_lock = asyncio.Lock()
        self._base_corpus = BaseCorpus()
        self.train_lock = registry.train_lock   # several workers: also a database lease (bots/cluster.py)

    @property
    def running(self) -> RunState | None:
        run = self.current
        return run if run is not None and run.task is not None and not run.task.done() else None

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
        return await self.lineage.count_new_user_messages(after_message_id=watermark), watermark

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

    def _progress(self, event: Event) -> None:
        if self.current is not None:
            self.current.follow(event)
        self.notifiers.progress(event)

    async def start(self, trigger: str, *, force: bool = True, notify_to: list[tuple] | None = None) -> int:
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
            self.current = run
            run.task = asyncio.create_task(self._execute(run), name=f"mynah-retrain-{run_id}")
            return run_id

    async def wait(self) -> RunResult | None:
        """Wait for the run in flight (if any) and return its result."""
        run = self.current
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
        self._progress(RunEnded(result.status.value, result.decision.value, result.reason, run_id=run.run_id))
        if run.notify_to:
            await self.notifiers.notify(run.notify_to, Outgoing(result.summary(), image=result.loss_curve))
        return result

    async def _record(self, run: RunState, result: RunResult) -> None:
        try:
            await self.store.runs.update_training_run(
                run.run_id, status=result.status.value, decision=result.decision_text(), data=result.data or None,
                losses=result.losses or None, finished=True,
                error=result.reason if result.status in (RunStatus.FAILED, RunStatus.INTERRUPTED) else None)
        except Exception:
            log.exception("could not record run #%d", run.run_id)

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
        self._progress(Stage("exporting dialogues", run_id=run.run_id))
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
        self._progress(Stage("promoting", run_id=run.run_id))
        before, after, data = trained.before, trained.after, plan.counts
        metrics = {"held_out_loss": after.get("held_out"), "held_out_loss_before": before.get("held_out"),
                   "base_loss": after.get("base"), "base_loss_before": before.get("base"),
                   "held_out_dialogues": data["held_out"], "base_eval_dialogues": data["base_eval"],
                   "base_corpus": self.lc.base_corpus, "train": trained.train}
        if self.canary is not None and self.canary.enabled and not self.lc.require_approval:
            await self.canary.begin(run, active, plan.through, metrics, trained.candidate, result)
            if result.data.get("candidate"):           # its lineage, so /forget can retire it too
                await self.lineage.record_lineage(result.data["candidate"], plan.users, plan.trained_ids)
            return
        try:
            version = await self.promoter.promote(trained.candidate, active=active, run_id=run.run_id,
                                                  trigger=run.trigger, through=plan.through, metrics=metrics,
                                                  activate=not self.lc.require_approval)
        except PromotionRefused as exc:
            result.decision, result.reason = Decision.REJECTED, str(exc)
            return
        await self.lineage.record_lineage(version.name, plan.users, plan.trained_ids)
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
            targets = run.notify_to or configured_targets(self.lc.notify)
            await self.notifiers.notify(targets, Outgoing(approval_text(version.name, result, trained.probes)))
            return
        result.promoted = version.name
