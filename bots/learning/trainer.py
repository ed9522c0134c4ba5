"""The trainer child process, seen from the parent.

Training never runs in the bot's event loop or its generation thread: each run starts
``python -m engine.training.finetune job.json`` (nice, few threads, bounded memory, its own
session) and reads its progress, one typed event per stdout line (engine/training/events.py). The child writes
result.json; a child that dies, overruns its time or fails is turned into a RunFailed whose
message says why in words an admin can act on (disk full, out of memory, killed by …).
A cancelled run (the bot stops) stops the child: SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bots.learning.export import DATA_FILE, FORGOTTEN_FILE
from bots.learning.report import method_facts
from engine.registry import Version, folder_bytes, write_json_atomic
from engine.serving.protocol import SamplingParams
from engine.training.devices import launch_command, plan_devices
from engine.training.events import Event, Finished, read_event
from engine.training.finetune import FinetuneJob, TrainSettings
from engine.training.lora import LoraSettings

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
LOG_FILE = "trainer.log"


class RunFailed(RuntimeError):
    """A run that ends with a clear reason (disk full, out of memory, trainer killed …)."""


@dataclass
class TrainerResult:
    """What a successful child reports (result.json)."""
    before: dict                     # the active model's losses: {"held_out": …, "base": … or None}
    after: dict                      # the candidate's, on the same dialogues
    finite: bool                     # every candidate weight is finite
    candidate: Path                  # the candidate's model folder
    loss_curve: Path
    train: dict                      # engine.training.train's metrics (steps, best_valid_loss, …)
    dropped_forgotten: int = 0       # dialogues dropped because of a /forget after the export
    max_resident_mb: int | None = None
    base_model: str = ""             # LoRA: the model the adapter applies to
    launched_by_accelerate: bool = False
    probes: dict = field(default_factory=dict)   # {"active": [{"prompt", "replies"}], "candidate": [...]}

    @classmethod
    def from_finished(cls, raw: Finished, job: FinetuneJob) -> "TrainerResult":
        candidate = Path(raw.candidate or job.output)
        return cls(before=raw.before, after=raw.after, finite=raw.finite, candidate=candidate,
                   loss_curve=Path(raw.loss_curve or candidate / "loss_curve.png"), train=raw.train,
                   dropped_forgotten=raw.counts.get("dropped_forgotten", 0), max_resident_mb=raw.max_resident_mb,
                   base_model=raw.base_model, launched_by_accelerate=raw.launched_by_accelerate, probes=raw.probes)

    def probe_replies(self, which: str) -> list[str]:
        return [r for p in self.probes.get(which) or [] for r in p.get("replies") or []]


def local_model_folder(version: Version) -> str:
    """The version's model folder on this machine (a hub name stays as it is)."""
    from engine.model import resolve_path

    try:
        return resolve_path(version.model_path)
    except Exception:
        return version.model_path


def candidate_bytes(config, active: Version) -> int:
    """What a run's candidate will take on disk: a model like the active one (full fine-tune),
    or an adapter (LoRA: about the active adapter's size; a first adapter is small, 64 MB is ample)."""
    if config.learning.method == "lora":
        return folder_bytes(active.folder) if active.kind == "lora" else 64 * 2**20
    return folder_bytes(local_model_folder(active))


def _child_model_path(version: Version) -> str:
    """What the child loads: absolute for folders (it may run elsewhere), as is for hub names."""
    path = local_model_folder(version)
    return str(Path(path).resolve()) if Path(path).exists() else path


def training_init(config, active: Version) -> str:
    """What a run starts from: the active version, except that a LoRA run on a model served
    elsewhere starts from [learning] base_model (the local copy of the backend's model) until
    the active version is itself an adapter on it."""
    lc = config.learning
    if lc.method == "lora" and lc.base_model and active.kind == "configured":
        from engine.model import resolve_path

        path = resolve_path(lc.base_model)
        return str(Path(path).resolve()) if Path(path).exists() else path
    return _child_model_path(active)


def build_job(config, run_id: int, active: Version, folder: Path) -> FinetuneJob:
    """The job for fine-tuning `active` on folder/data.jsonl into folder/candidate-run-N, on the
    hardware [learning] devices names (several GPUs: DDP under accelerate)."""
    from bots.learning.probes import probe_prompts

    lc, folder = config.learning, folder.resolve()
    try:
        plan = plan_devices(lc.devices, config.model.device)
    except ValueError as exc:
        raise RunFailed(str(exc)) from None
    if plan.distributed and importlib.util.find_spec("accelerate") is None:
        raise RunFailed(f"training on {plan.processes} GPUs needs the accelerate package: pip install 'mynah[scale]' "
                        "(or set [learning] devices = \"cuda\" for one GPU)")
    return FinetuneJob(
        run_id=run_id, init=training_init(config, active), format=config.model.format, device=plan.device,
        data=str(folder / DATA_FILE), forgotten=str(folder / FORGOTTEN_FILE),
        output=str(folder / f"candidate-run-{run_id}"), result=str(folder / RESULT_FILE),
        threads=lc.threads, nice=lc.nice, max_memory_mb=lc.max_memory_mb, method=lc.method,
        distributed=plan.distributed, processes=plan.processes, probes=probe_prompts(lc),
        sampling=SamplingParams.from_settings(config.generation),
        train=TrainSettings(lr=lc.lr, epochs=lc.epochs, batch_size=lc.batch_size, max_len=lc.max_len,
                            max_minutes=lc.max_minutes, seed=run_id),
        lora=LoraSettings(r=lc.lora_r, alpha=lc.lora_alpha, dropout=lc.lora_dropout,
                          target_modules=list(lc.lora_target_modules)))


def write_job(folder: Path, job: FinetuneJob, forgotten: set[int]) -> None:
    """job.json, and forgotten.json (exported ids already deleted by /forget: the child drops them)."""
    write_json_atomic(folder / JOB_FILE, job.to_json())
    write_json_atomic(folder / FORGOTTEN_FILE, sorted(forgotten))


def _project_root() -> str:
    """The folder that holds the engine package (the child imports it from there)."""
    import engine

    return str(Path(engine.__file__).resolve().parent.parent)


_SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "APIKEY", "CREDENTIAL")


def child_environment(parent: dict[str, str]) -> dict[str, str]:
    """The trainer's environment: the parent's minus anything secret-looking.

    The child only reads job files and writes weights; it never talks to a chat platform,
    so a crash dump or a stray subprocess of it must not carry the bot tokens."""
    return {k: v for k, v in parent.items() if not any(m in k.upper() for m in _SECRET_MARKERS)}


async def _spawn(folder: Path, threads: int, job: FinetuneJob):
    env = child_environment(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH", "")) if p)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(folder / LOG_FILE, "ab") as stderr:
        command = launch_command("engine.training.finetune", [str((folder / JOB_FILE).resolve())],
                                 device=job.device, processes=job.processes, accelerate=job.distributed)
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env=env, start_new_session=True, limit=2**22)


async def run_trainer(job: FinetuneJob, folder: Path, *, threads: int, max_minutes: float,
                      on_event: Callable[[Event], None], on_started: Callable[[int], None]) -> TrainerResult:
    """Run the child on folder/job.json to the end; each progress event (tagged with the run
    id) goes to `on_event`. Raises RunFailed with the reason when it does not succeed."""
    proc = await _spawn(folder, threads, job)
    on_started(proc.pid)
    last: Finished | None = None
    timeout = max_minutes * 60 * 2 + 1800 if max_minutes > 0 else None

    async def pump() -> None:
        nonlocal last
        async for line in proc.stdout:
            event = read_event(line)
            if event is None:
                continue
            event.run_id = job.run_id
            if isinstance(event, Finished):
                last = event
            on_event(event)
        await proc.wait()

    try:
        await asyncio.wait_for(pump(), timeout)
    except asyncio.TimeoutError:
        await stop_process(proc)
        raise RunFailed(f"the trainer ran past its time limit ({timeout / 60:.0f} min) and was stopped")
    except BaseException:
        await stop_process(proc)
        raise
    result = None
    with contextlib.suppress(OSError):
        result = read_event((folder / RESULT_FILE).read_text(encoding="utf-8"))
    result = result if isinstance(result, Finished) else last
    if proc.returncode != 0 or result is None or not result.ok:
        raise RunFailed(failure_reason(proc.returncode, result, folder))
    return TrainerResult.from_finished(result, job)


def check_disk(config, root: Path, active: Version, folder: Path) -> None:
    """Room for a candidate (twice its expected size) plus [learning] min_free_disk_mb."""
    import shutil

    need_mb = 2 * candidate_bytes(config, active) / 2**20 + config.learning.min_free_disk_mb
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < need_mb:
        raise RunFailed(f"disk full: {free_mb:.0f} MB free in {root}, a run needs {need_mb:.0f} MB "
                        "(the candidate model plus [learning] min_free_disk_mb)")


def keep_training_record(result, trained: TrainerResult, folder: Path) -> None:
    """The losses and training numbers into the run's result; the loss curve and metrics into
    the run folder (blocking: call from a thread)."""
    import shutil

    result.losses = {"before": trained.before, "after": trained.after}
    result.data = {**result.data, "steps": trained.train.get("steps"),
                   "train_time_s": trained.train.get("train_time_s"),
                   "max_resident_mb": trained.max_resident_mb, "dropped_forgotten": trained.dropped_forgotten,
                   **method_facts(trained.train, trained.base_model)}
    if trained.loss_curve.is_file():
        shutil.copyfile(trained.loss_curve, folder / "loss_curve.png")
        result.loss_curve = folder / "loss_curve.png"
    with contextlib.suppress(OSError):
        shutil.copyfile(trained.candidate / "metrics.json", folder / "metrics.json")


def failure_reason(code: int | None, result: Finished | None, folder: Path) -> str:
    """Why the child failed, from its result, its exit signal or the last line of its log."""
    if result is not None and result.error:
        return f"the trainer failed: {result.error}"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory? the kernel's OOM killer uses SIGKILL)" if -code == signal.SIGKILL else ""
        return f"the trainer was killed by {name}{hint}"
    tail = ""
    with contextlib.suppress(OSError):
        lines = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = lines[-1] if lines else ""
    if "MemoryError" in tail or "allocate memory" in tail:
        return f"the trainer ran out of memory ([learning] max_memory_mb): {tail}"
    if "No space left on device" in tail:
        return f"disk full: {tail}"
    return f"the trainer exited with status {code}" + (f": {tail}" if tail else "")


async def stop_process(proc) -> None:
    """SIGTERM the trainer's process group (under accelerate: the launcher and every rank), SIGKILL
    it if it lingers."""
    if proc.returncode is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except asyncio.TimeoutError:
        _signal_group(proc, signal.SIGKILL)
        await proc.wait()


def _signal_group(proc, sig: int) -> None:
    """The child leads its own session (start_new_session), so its group id is its pid."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
