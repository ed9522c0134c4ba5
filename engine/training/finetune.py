"""The learning loop's trainer: one fine-tuning job, run as a child process.

    python -m engine.training.finetune JOB.json

The bot (bots/learning/) or `mynah retrain` exports the dialogues, writes JOB.json (a
``FinetuneJob``, below) and starts this in a separate process, so training never runs in
the bot's event loop or its generation thread. The job runs at a lower priority (os.nice),
with a capped number of torch threads and a memory bound (RLIMIT_AS plus a resident-memory
check), so chats keep flowing while it trains.

What it does:
1. read the exported dialogues (splits "train", "held_out", "base_eval"), dropping any that
   hold a message id listed in the job's `forgotten` file (a /forget that came after the
   export keeps those messages out);
2. evaluate the current (active) model on the held-out dialogues and the base-corpus sample;
3. fine-tune it (engine.training.train.train with init = the active model; early stopping on a
   validation slice of the training dialogues, never on the held-out set);
4. load the saved candidate back (a candidate that does not load is a failure) and evaluate
   it on exactly the same dialogues; both models also answer the job's probe prompts with
   the same seeds (the parent's parrot check compares the replies with each user's text);
5. write result.json (atomically) and print it as the last stdout line.

Progress goes to stdout as one JSON line per event (engine/training/events.py); logs go to stderr.
It never decides whether to promote and never touches the registry's pointer: the parent
does, so killing this process at any moment changes nothing that is being served.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.serving.protocol import SamplingParams
from engine.training.events import Data, Event, Finished, Scored, Stage, Started, Train, to_json
from engine.training.lora import LoraSettings

log = logging.getLogger("engine.training.finetune")


@dataclass
class TrainSettings:
    """How the candidate is trained (engine.training.train.TrainConfig's knobs a run sets)."""
    lr: float = 1e-4
    epochs: float = 2.0
    batch_size: int = 8
    max_len: int = 256
    max_minutes: float = 0.0          # 0 = no time budget
    valid_fraction: float = 0.1       # early stopping looks at this slice of the training dialogues
    patience: int = 3
    warmup_steps: int = 10
    seed: int = 0


@dataclass
class FinetuneJob:
    """JOB.json: everything the child needs, written by the parent, read here. The defaults
    live only here, so the two sides cannot disagree about an omitted field."""
    init: str                         # the model to start from (the active version), a folder or hub name
    data: str                         # data.jsonl: {"split", "turns", "ids"} per line
    output: str                       # the candidate's folder (written under a temp name, then renamed)
    run_id: int | None = None
    format: str = "auto"
    device: str = "auto"
    forgotten: str = ""               # a JSON list of message ids deleted by /forget since the export
    result: str = ""                  # where to write result.json ("" = stdout only)
    threads: int = 0                  # torch threads (0 = torch's default)
    nice: int = 0
    max_memory_mb: int = 0            # 0 = no limit
    method: str = "full"              # "full": every weight; "lora": an adapter on `init` (engine.training.lora)
    distributed: bool = False         # started by `accelerate launch` (engine.training.devices), DDP when processes > 1
    processes: int = 1                # one per GPU
    probes: list = field(default_factory=list)   # prompts both models answer (sampled, fixed seeds)
    probe_samples: int = 3
    sampling: SamplingParams = field(default_factory=SamplingParams)   # how probe replies are drawn (as served)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise ValueError(f"method must be \"full\" or \"lora\", got {self.method!r}")
        for obj in (self, self.train, self.lora, self.sampling):
            _coerce_numbers(obj)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, source: str | Path | dict) -> "FinetuneJob":
        """From a JOB.json path or its parsed dict; an unknown field is an error, not ignored."""
        raw = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        raw = dict(raw)
        train = TrainSettings(**raw.pop("train", None) or {})
        lora = LoraSettings(**raw.pop("lora", None) or {})
        sampling = SamplingParams(**raw.pop("sampling", None) or {})
        return cls(**raw, train=train, lora=lora, sampling=sampling)


def _coerce_numbers(obj) -> None:
    """JSON has one number type: 2 in a float field becomes 2.0, 3.0 in an int field 3."""
    for f in fields(obj):
        cast = {"int": int, "float": float, "int | None": int}.get(f.type)
        value = getattr(obj, f.name)
        if cast is not None and value is not None:
            setattr(obj, f.name, cast(value))


class TrainerMemoryError(MemoryError):
    """The trainer went over its memory budget."""


_QUIET = False   # a DDP rank other than the first: only rank 0 talks to the parent


def emit(event: Event) -> None:
    """One progress line for the parent (engine/training/events.py: the records and their reader)."""
    if _QUIET:
        return
    sys.stdout.write(to_json(event) + "\n")
    sys.stdout.flush()


def _proc_status_mb(key: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def resident_mb() -> int:
    return _proc_status_mb("VmRSS")


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so an orphaned trainer never runs on. SIGKILL,
    not SIGTERM: the bot pauses the trainer (SIGSTOP) while it answers chats, and a stopped
    process would hold a SIGTERM pending forever if the bot died then."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lower_priority(nice: int) -> None:
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:
            log.warning("could not lower the priority: %s", exc)


_AS_LIMIT_MB = 0


def limit_memory(max_mb: int) -> None:
    """Cap the address space at what is mapped now plus the budget (the OOM killer must
    never have to choose between the trainer and the bot)."""
    global _AS_LIMIT_MB
    if max_mb <= 0:
        return
    limit = (_proc_status_mb("VmSize") + max_mb) * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    _AS_LIMIT_MB = limit // 2**20


def hit_memory_limit() -> bool:
    """Whether the address space came within 64 MB of the cap: a failure then, whatever
    exception a C extension turned it into, is an out-of-memory failure."""
    return bool(_AS_LIMIT_MB) and _proc_status_mb("VmPeak") >= _AS_LIMIT_MB - 64


def lift_memory_limit() -> None:
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    except (OSError, ValueError):
        pass
    import gc

    gc.collect()


GROUP_PREFIX = "held_out:"    # a held-out dialogue's contributor (the export's "group"), scored on its own


def read_data(path: str | Path, forgotten: set[int]) -> tuple[dict[str, list[list[str]]], int]:
    """{"train": [...], "held_out": [...], "base_eval": [...], "held_out:c1": [...], …} and how
    many dialogues were dropped."""
    splits: dict[str, list[list[str]]] = {"train": [], "held_out": [], "base_eval": []}
    dropped = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if forgotten and forgotten.intersection(row.get("ids") or ()):
                dropped += 1
                continue
            splits.setdefault(row["split"], []).append(list(row["turns"]))
            if row["split"] == "held_out" and row.get("group"):
                splits.setdefault(f"{GROUP_PREFIX}{row['group']}", []).append(list(row["turns"]))
    return splits, dropped


def classify(exc: BaseException) -> str:
    """A clear, one-line reason for a failed job."""
    text = f"{type(exc).__name__}: {exc}"
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:  # a wrapped cause counts (ModelLoadError from MemoryError)
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, TrainerMemoryError):
        return f"out of memory: {exc}"
    if hit_memory_limit():
        return (f"out of memory: the trainer reached its address-space limit of {_AS_LIMIT_MB} MB "
                f"([learning] max_memory_mb = {_limit_note()}): {text}")
    for e in chain:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e) or "Cannot allocate memory" in str(e):
            return f"out of memory (the trainer's limit is [learning] max_memory_mb = {_limit_note()}): {text}"
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"disk full: {text}"
    return text


_MAX_MB = 0


def _limit_note() -> str:
    return f"{_MAX_MB} MB" if _MAX_MB else "no limit"


def _finite_parameters(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class _Guard:
    """The memory budget and the parent's presence, checked at every stage and step."""

    def __init__(self, max_mb: int):
        self.max_mb = max_mb
        self.parent = os.getppid()

    def check(self, stage: str) -> None:
        if self.max_mb > 0 and resident_mb() > self.max_mb:
            raise TrainerMemoryError(f"{resident_mb()} MB resident while {stage}, over the {self.max_mb} MB limit "
                                     "([learning] max_memory_mb)")
        if os.getppid() != self.parent:
            raise RuntimeError("the parent process went away; stopping")


def _read_splits(job: FinetuneJob) -> tuple[dict[str, list[list[str]]], dict]:
    """The exported dialogues minus what /forget removed since the export, and their counts."""
    forgotten: set[int] = set()
    if job.forgotten:
        forgotten = set(json.loads(Path(job.forgotten).read_text(encoding="utf-8")))
    splits, dropped = read_data(job.data, forgotten)
    counts = {"train": len(splits["train"]), "held_out": len(splits["held_out"]),
              "base_eval": len(splits["base_eval"]), "dropped_forgotten": dropped}
    emit(Data(**counts))
    if not splits["held_out"]:
        raise ValueError("no held-out dialogues to evaluate on")
    if len(splits["train"]) < 2:
        raise ValueError(f"need at least 2 training dialogues, got {len(splits['train'])}")
    return splits, counts


def _fine_tune(job: FinetuneJob, train_d: list[list[str]], est_steps: int, guard: _Guard) -> dict:
    """engine.training.train with init = the active model: about six evaluations per run (early
    stopping on a validation slice of the training dialogues; the held-out set is never seen
    before the final scoring)."""
    from engine.model import pick_device
    from engine.training.train import TrainConfig, train

    t = job.train

    def on_progress(info: Train) -> None:
        guard.check("training")
        emit(info)

    return train(TrainConfig(
        output=job.output, overwrite=True, dialogues=train_d, valid_fraction=t.valid_fraction, max_len=t.max_len,
        init=job.init, format=job.format, lr=t.lr, batch_size=t.batch_size, epochs=t.epochs,
        max_minutes=t.max_minutes, eval_every=max(5, est_steps // 6), eval_batch_size=8,
        patience=t.patience, warmup_steps=t.warmup_steps, device=job.device,
        threads=job.threads, seed=t.seed, progress=False, log_every=max(1, min(10, est_steps // 20)),
        command=f"learning run {job.run_id}", on_progress=on_progress,
        lora=job.lora if job.method == "lora" else None, distributed=job.distributed,
        memory_mb=job.max_memory_mb if pick_device(job.device).type == "cpu" else 0,
    ))


def _rank() -> int:
    """This process's DDP rank under `accelerate launch` (0 when alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def _planned_steps(job: FinetuneJob, train_d: list[list[str]]) -> int:
    """Optimizer steps the run will take, from the tokenizer alone: every DDP rank must agree on
    it (it sets when they evaluate together) without loading the model."""
    from engine.dialogue import DialogueFormat
    from engine.model import load_model_tokenizer
    from engine.training.data import encode_windows

    t = job.train
    n_windows = len(encode_windows(DialogueFormat(load_model_tokenizer(job.init), job.format), train_d, t.max_len))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if job.distributed else 1
    return max(1, round(t.epochs * math.ceil(n_windows * (1 - t.valid_fraction) / t.batch_size / world)))


def _free(model) -> None:
    """Drop a model before the next is loaded (on a GPU the cache is given back too)."""
    import gc

    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job(job: FinetuneJob) -> dict:
    """Evaluate, fine-tune, evaluate; return the result (raises on failure). Under DDP only rank 0
    evaluates and reports; the other ranks train alongside it."""
    import torch

    from engine.model import load_model, pick_device
    from engine.training.train import evaluate_loss

    started = time.time()
    if job.threads > 0:
        torch.set_num_threads(job.threads)
    global _MAX_MB
    _MAX_MB = job.max_memory_mb
    guard = _Guard(job.max_memory_mb)
    guard.check("starting")                # already over budget: say so before anything fails oddly
    if pick_device(job.device).type == "cpu":
        limit_memory(job.max_memory_mb)    # not with CUDA: its driver maps far more address space than it uses
    splits, counts = _read_splits(job)
    train_d, held_out, base_eval = splits["train"], splits["held_out"], splits["base_eval"]
    t = job.train
    est_steps = _planned_steps(job, train_d)
    if job.distributed and _rank() != 0:
        _fine_tune(job, train_d, est_steps, guard)
        return {"ok": True}   # a rank other than the first reports nothing

    def losses(model, fmt) -> dict:
        out = {"held_out": evaluate_loss(model, fmt, held_out, batch_size=8, max_len=t.max_len)}
        guard.check("evaluating")
        out["base"] = evaluate_loss(model, fmt, base_eval, batch_size=8, max_len=t.max_len) if base_eval else None
        guard.check("evaluating")
        groups = {k[len(GROUP_PREFIX):]: v for k, v in splits.items() if k.startswith(GROUP_PREFIX)}
        if len(groups) >= 2:   # each held-out contributor's loss: whether the gain is broad (decide.py)
            out["groups"] = {g: evaluate_loss(model, fmt, ds, batch_size=8, max_len=t.max_len)
                             for g, ds in sorted(groups.items())}
            guard.check("evaluating")
        return out

    # 1. the model being served now (an adapter: merged into its base), on the held-out and base dialogues
    emit(Stage("evaluating the active model"))
    active = load_model(job.init, fmt=job.format, device=job.device)
    before = losses(active.model, active.fmt)
    emit(Scored("before", held_out=before["held_out"], base=before["base"]))   # each contributor's: in the result
    probes = {"active": _probe(job, active)}
    _free(active)
    # 2. fine-tune it (LoRA: train an adapter on it, or train the active adapter further)
    emit(Stage("training"))
    metrics = _fine_tune(job, train_d, est_steps, guard)

    # 3. the candidate as it will be served: loaded back from disk (base + adapter), same dialogues
    emit(Stage("evaluating the candidate"))
    try:
        candidate = load_model(job.output, fmt=job.format, device=job.device)
    except Exception as exc:
        raise RuntimeError(f"the candidate does not load: {exc}") from exc
    after = losses(candidate.model, candidate.fmt)
    finite = _finite_parameters(candidate.model) and all(v is None or math.isfinite(v) for k, v in after.items()
                                                         if k != "groups")
    emit(Scored("after", held_out=after["held_out"], base=after["base"]))
    probes["candidate"] = _probe(job, candidate)
    keep = ("best_valid_loss", "initial_valid_loss", "best_step", "steps", "tokens", "tokens_per_s",
            "train_time_s", "stopped_early", "stop_reason", "params", "trainable_params", "device", "processes",
            "method", "accelerate", "lr", "data", "lora")
    return {"ok": True, "before": before, "after": after, "finite": finite, "counts": counts,
            "train": {k: metrics.get(k) for k in keep}, "candidate": str(job.output),
            "base_model": _base_of(job), "launched_by_accelerate": "ACCELERATE_MIXED_PRECISION" in os.environ,
            "loss_curve": str(Path(job.output) / "loss_curve.png"),
            "duration_s": time.time() - started, "max_resident_mb": _proc_status_mb("VmHWM"), "probes": probes}


def _base_of(job: FinetuneJob) -> str:
    """The base model of a LoRA candidate ("" for a full fine-tune)."""
    if job.method != "lora":
        return ""
    from engine.model import lora_base_path

    return lora_base_path(job.init)


def _probe(job: FinetuneJob, loaded) -> list[dict]:
    """Both models' sampled replies to the probe prompts, same seeds (the parrot check's evidence)."""
    if not job.probes:
        return []
    from engine.training.probes import sample_replies

    emit(Stage("sampling probe replies"))
    return sample_replies(loaded, list(job.probes), job.sampling, samples=job.probe_samples, seed=job.train.seed)


def write_result(path: str | Path | None, result: Finished) -> None:
    if not path:
        return
    try:
        from engine.registry import write_json_atomic

        write_json_atomic(Path(path), json.loads(to_json(result)))
    except OSError as exc:  # a full disk must not hide the real reason: stdout still carries it
        log.error("could not write %s: %s", path, exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m engine.training.finetune JOB.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    die_with_parent()
    job = FinetuneJob.from_json(argv[0])
    global _QUIET
    _QUIET = job.distributed and _rank() != 0
    lower_priority(job.nice)
    emit(Started(os.getpid(), run_id=job.run_id))
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        result = Finished(**run_job(job))
        code = 0
    except BaseException as exc:  # everything ends in a result with a reason
        lift_memory_limit()  # reporting an out-of-memory failure needs a little memory itself
        if isinstance(exc, KeyboardInterrupt):
            exc = RuntimeError("interrupted")
        log.exception("the job failed")
        result = Finished(ok=False, error=classify(exc))
        code = 1
    if not _QUIET:
        write_result(job.result, result)
    emit(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
