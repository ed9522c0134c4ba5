"""The trainer child process, seen from the parent.

Training never runs in the bot's event loop or its generation thread: each run starts
``python -m engine.training.finetune job.json`` (nice, few threads, bounded memory, its own
session) and reads its progress, one JSON object per stdout line. The child writes
result.json; a child that dies, overruns its time or fails is turned into a RunFailed whose
message says why in words an admin can act on (disk full, out of memory, killed by …).
A cancelled run (the bot stops) stops the child: SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bots.learning.export import DATA_FILE, FORGOTTEN_FILE
from engine.registry import Version, write_json_atomic
from engine.training.finetune import FinetuneJob, TrainSettings

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

    @classmethod
    def from_json(cls, raw: dict, job: FinetuneJob) -> "TrainerResult":
        candidate = Path(raw.get("candidate") or job.output)
        return cls(before=raw.get("before") or {}, after=raw.get("after") or {}, finite=bool(raw.get("finite", False)),
                   candidate=candidate, loss_curve=Path(raw.get("loss_curve") or candidate / "loss_curve.png"),
                   train=raw.get("train") or {},
                   dropped_forgotten=(raw.get("counts") or {}).get("dropped_forgotten", 0),
                   max_resident_mb=raw.get("max_resident_mb"))


def local_model_folder(version: Version) -> str:
    """The version's model folder on this machine (a hub name stays as it is)."""
    from engine.model import resolve_path

    try:
        return resolve_path(version.model_path)
    except Exception:
        return version.model_path


def _child_model_path(version: Version) -> str:
    """What the child loads: absolute for folders (it may run elsewhere), as is for hub names."""
    path = local_model_folder(version)
    return str(Path(path).resolve()) if Path(path).exists() else path


def build_job(config, run_id: int, active: Version, folder: Path) -> FinetuneJob:
    """The job for fine-tuning `active` on folder/data.jsonl into folder/candidate-run-N."""
    lc, folder = config.learning, folder.resolve()
    return FinetuneJob(
        run_id=run_id, init=_child_model_path(active), format=config.model.format, device=config.model.device,
        data=str(folder / DATA_FILE), forgotten=str(folder / FORGOTTEN_FILE),
        output=str(folder / f"candidate-run-{run_id}"), result=str(folder / RESULT_FILE),
        threads=lc.threads, nice=lc.nice, max_memory_mb=lc.max_memory_mb,
        train=TrainSettings(lr=lc.lr, epochs=lc.epochs, batch_size=lc.batch_size, max_len=lc.max_len,
                            max_minutes=lc.max_minutes, seed=run_id))


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

    The child only reads job files and writes weights; it never talks to Telegram or
    Discord, so a crash dump or a stray subprocess of it must not carry the bot tokens."""
    return {k: v for k, v in parent.items() if not any(m in k.upper() for m in _SECRET_MARKERS)}


async def _spawn(folder: Path, threads: int):
    env = child_environment(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(), env.get("PYTHONPATH", "")) if p)
    if threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(folder / LOG_FILE, "ab") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine.training.finetune", str((folder / JOB_FILE).resolve()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
            env=env, start_new_session=True, limit=2**22)


async def run_trainer(job: FinetuneJob, folder: Path, *, threads: int, max_minutes: float,
                      on_event: Callable[[dict], None], on_started: Callable[[int], None]) -> TrainerResult:
    """Run the child on folder/job.json to the end; each progress event (tagged with the run
    id) goes to `on_event`. Raises RunFailed with the reason when it does not succeed."""
    proc = await _spawn(folder, threads)
    on_started(proc.pid)
    last: dict = {}
    timeout = max_minutes * 60 * 2 + 1800 if max_minutes > 0 else None

    async def pump() -> None:
        nonlocal last
        async for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["run_id"] = job.run_id
            if event.get("event") == "finished":
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
    with contextlib.suppress(OSError, ValueError):
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    result = result or last or None
    if proc.returncode != 0 or not result or not result.get("ok"):
        raise RunFailed(failure_reason(proc.returncode, result, folder))
    return TrainerResult.from_json(result, job)


def failure_reason(code: int | None, result: dict | None, folder: Path) -> str:
    """Why the child failed, from its result, its exit signal or the last line of its log."""
    if result and result.get("error"):
        return f"the trainer failed: {result['error']}"
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
