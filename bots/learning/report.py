"""What people read about runs and versions: a run's summary, /models, /status, `mynah models`.

Mostly text from facts handed in, so the bot, the admin commands and the CLI print the same
lines; `status_lines` gathers /status's facts itself (the registry, the runs table, the lock).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from bots.durations import duration, plural
from bots.learning.decide import Decision
from engine.registry import Version


class RunStatus(StrEnum):
    """How a run ended; the values are the strings the training_runs rows keep."""
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


@dataclass
class RunResult:
    run_id: int
    status: RunStatus                # done | failed | skipped | interrupted
    decision: Decision               # promoted | rejected | skipped | failed | interrupted
    reason: str = ""
    promoted: str | None = None      # the new version, when promoted
    base_version: str = ""
    losses: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    duration_s: float = 0.0
    loss_curve: Path | None = None

    def __post_init__(self) -> None:
        # plain strings are accepted; enums from here on (an Enum hashes by name, not value)
        self.status, self.decision = RunStatus(self.status), Decision(self.decision)

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.DONE

    def decision_text(self) -> str:
        """The training_runs row's decision column: "promoted v0002: why", "rejected: why", …"""
        if self.decision == Decision.PROMOTED:
            return f"promoted {self.promoted}: {self.reason}"
        if self.decision in (Decision.REJECTED, Decision.SKIPPED):
            return f"{self.decision.value}: {self.reason}"
        return self.decision.value

    def summary(self) -> str:
        """What admins read: the decision, the numbers, the data counts."""
        head = {
            Decision.PROMOTED: f"Retrain run #{self.run_id} finished in {duration(self.duration_s)}: promoted, "
                               f"now serving {self.promoted} (was {self.base_version}).",
            Decision.REJECTED: f"Retrain run #{self.run_id} finished in {duration(self.duration_s)}: not promoted, "
                               f"still serving {self.base_version}. {self.reason}",
            Decision.SKIPPED: f"Retrain run #{self.run_id} skipped: {self.reason}",
        }.get(self.decision, f"Retrain run #{self.run_id} {self.status.value} after {duration(self.duration_s)}: "
                             f"{self.reason}")
        lines = [head]
        before, after = self.losses.get("before") or {}, self.losses.get("after") or {}
        d = self.data
        if before.get("held_out") is not None and after.get("held_out") is not None:
            lines.append(f"Held-out loss ({d.get('held_out', '?')} newest dialogues): "
                         f"{delta(before['held_out'], after['held_out'])}")
        if before.get("base") is not None and after.get("base") is not None:
            lines.append(f"Base-corpus loss ({d.get('base_eval', '?')} dialogues): "
                         f"{delta(before['base'], after['base'])}")
        if "train_new" in d:
            lines.append(f"Data: {d.get('new_dialogues', 0)} new dialogues ({d['train_new']} trained on, "
                         f"{d.get('held_out', 0)} held out), {d.get('replay_old', 0)} older replayed, "
                         f"{d.get('replay_base', 0)} from the base corpus"
                         + (f"; {d['steps']} steps" if d.get("steps") is not None else "") + ".")
        if d.get("method"):
            lines.append(trained_line(d))
        return "\n".join(lines)


# ---- small pieces ----------------------------------------------------------------------

def delta(before: float, after: float) -> str:
    return f"{before:.4f} → {after:.4f} ({after - before:+.4f})"


def ago(timestamp: float) -> str:
    return f"{duration(time.time() - timestamp)} ago"


def short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


# ---- versions and runs (/models, /status, `mynah models`) --------------------------------

def describe_version(v: Version, active: str | None, replies: int | None = None) -> str:
    mark = "*" if v.name == active else " "
    when = dt.datetime.fromtimestamp(v.created_at).strftime("%Y-%m-%d %H:%M") if v.created_at else "?"
    if v.kind == "configured":
        what = f"configured model {v.source}"
    elif v.kind == "lora":
        what = f"LoRA adapter on {Path(v.base_model).name or v.base_model}, from {v.parent} by run #{v.run_id}"
    else:
        what = f"fine-tuned from {v.parent} by run #{v.run_id}"
    m = v.metrics
    nums = ""
    if m.get("held_out_loss") is not None:
        nums = f"; held-out {m['held_out_loss_before']:.4f} → {m['held_out_loss']:.4f}"
        if m.get("base_loss") is not None:
            nums += f", base {m['base_loss_before']:.4f} → {m['base_loss']:.4f}"
    used = f"; {plural(replies, 'reply')}" if replies else ""
    return f"{mark} {v.name}  {when}  {what}{nums}{used}"


def describe_run(r: dict) -> str:
    """One training_runs row (as storage.runs.Runs.training_runs returns it) on one line."""
    dur = duration(r["duration_s"]) if r.get("duration_s") is not None else "running"
    what = r.get("decision") or r["status"]
    if r["status"] in (RunStatus.FAILED, RunStatus.INTERRUPTED) and r.get("error"):
        what = f"{r['status']}: {r['error']}"
    losses = r.get("losses") or {}
    b, a = (losses.get("before") or {}).get("held_out"), (losses.get("after") or {}).get("held_out")
    nums = f" [held-out {b:.3f} → {a:.3f}]" if b is not None and a is not None else ""
    when = dt.datetime.fromtimestamp(r["started_at"]).strftime("%m-%d %H:%M")
    return f"#{r['id']} {when} {r['trigger']}, {dur}: {short(what, 160)}{nums}"


NO_VERSIONS = "No model versions yet."


def models_text(versions: list[Version], active: str | None, replies: dict[str, int], limit: int = 15,
                lineage: dict[str, dict] | None = None, tainted: dict[str, str] | None = None) -> str:
    """/models: the newest `limit` versions, newest first, with how many replies each wrote,
    what each was trained on (lineage) and which versions /forget retired (tainted)."""
    if not versions:
        return NO_VERSIONS
    lineage, tainted = lineage or {}, tainted or {}
    lines = [f"Model versions ({len(versions)}, newest first; * = active):"]
    for v in reversed(versions[-limit:]):
        line = describe_version(v, active, replies.get(v.name))
        if v.name in lineage:
            line += (f"; trained on {plural(lineage[v.name]['messages'], 'message')} of "
                     f"{plural(lineage[v.name]['users'], 'user')}")
        if v.awaiting_approval:
            line += f"; awaiting approval (/promote {v.name})"
        lines.append(line + (f"; TAINTED: {tainted[v.name]}" if v.name in tainted else ""))
    if len(versions) > limit:
        lines.append(f"… and {len(versions) - limit} older")
    gone = sorted(set(tainted) - {v.name for v in versions})
    if gone:
        lines.append(f"Retired and deleted after /forget (tainted): {', '.join(gone)}")
    return "\n".join(lines)


def active_lines(active: Version, serving: str | None) -> list[str]:
    """/status: the active version and its numbers (and what is served, while they differ)."""
    m = active.metrics
    if m.get("held_out_loss") is not None:
        lines = [f"Active version: {active.name}, held-out loss {m['held_out_loss']:.4f} "
                 f"(was {m['held_out_loss_before']:.4f} on {m.get('held_out_dialogues', '?')} dialogues)"
                 + (f", base loss {m['base_loss']:.4f}" if m.get("base_loss") is not None else "")]
    else:
        lines = [f"Active version: {active.name} ({active.kind}: {active.source or active.parent}); "
                 "held-out loss: not measured yet"]
    if serving and serving != active.name:
        lines.append(f"Serving {serving} (switching to {active.name})")
    return lines


def method_facts(train: dict, base_model: str) -> dict:
    """What a run's record keeps about how it trained (from the trainer's metrics)."""
    lora = train.get("lora") or {}
    facts = {"method": train.get("method") or "full", "device": train.get("device") or "?",
             "processes": train.get("processes") or 1, "trainable_params": train.get("trainable_params"),
             "params": train.get("params")}
    if facts["method"] == "lora":
        facts.update(base_model=base_model, lora_r=lora.get("r"), lora_alpha=lora.get("alpha"))
    return facts


def trained_line(d: dict) -> str:
    """/retrain's result: which method, on which device, from which base model."""
    device = d.get("device", "?") + (f" × {d['processes']} processes (DDP)" if (d.get("processes") or 1) > 1 else "")
    share = ""
    if d.get("trainable_params") and d.get("params"):
        share = f", {d['trainable_params']:,} of {d['params']:,} weights trained"
    if d.get("method") == "lora":
        return (f"Trained: LoRA (r={d.get('lora_r')}, alpha={d.get('lora_alpha')}{share}) on {device}; "
                f"base model {d.get('base_model') or '?'}.")
    return f"Trained: full fine-tune{share} on {device}."


def learning_line(config) -> str:
    """/status: how the next run will train (method, devices, base model)."""
    from engine.training.devices import plan_devices

    lc = config.learning
    try:
        where = plan_devices(lc.devices, config.model.device).describe()
    except ValueError as exc:
        where = f"no usable device ({exc})"
    method = f"LoRA (r={lc.lora_r}, alpha={lc.lora_alpha})" if lc.method == "lora" else "full fine-tune"
    base = f", base model {lc.base_model}" if lc.method == "lora" and lc.base_model else ""
    return f"Learning: {method} on {where} ([learning] devices = \"{lc.devices}\"){base}"


def next_run_line(when: dt.datetime | None, schedule: str) -> str:
    if when is None:
        return "Next scheduled run: none (the schedule is off)"
    wait = when.timestamp() - time.time()
    return (f"Next scheduled run: {when.strftime('%Y-%m-%d %H:%M %Z').strip()} "
            f"(in {duration(max(0.0, wait))}; schedule {schedule})")


def running_line(run_id: int, trigger: str, stage: str, step: int, total_steps: int, started: float) -> str:
    steps = f", step {step}/{total_steps}" if total_steps else ""
    return f"Running now: run #{run_id} ({trigger}): {stage}{steps}, {duration(time.time() - started)} so far"


async def status_lines(config, registry, serving: str | None, runs, schedule, trust, canary) -> list[str]:
    """The learning loop's part of /status, from its parts (runs.Runs, schedule.Scheduler,
    trust.Trust, canary.Canary or None)."""
    lc, lines = config.learning, []
    active = await asyncio.to_thread(registry.active)
    if active is not None:
        lines += active_lines(active, serving)
    lines.append(learning_line(config))
    new, _ = await runs.new_messages()
    lines.append(f"New since the active version: {plural(new, 'user message')} "
                 f"(a scheduled run needs {lc.min_new_messages})")
    lines.append(next_run_line(schedule.next_run_time(), lc.schedule))
    if trust.forgets_waiting:
        lines.append(f"A rebuild after /forget is queued ({trust.forgets_waiting} forget(s) waiting)")
    if schedule.last_check is not None:
        lines.append(f"Last scheduled check: {ago(schedule.last_check[0])}, {schedule.last_check[1]}")
    run = runs.running
    if run is not None:
        lines.append(running_line(run.run_id, run.trigger, run.stage, run.step, run.total_steps, run.started))
    else:
        holder = await asyncio.to_thread(registry.train_lock().holder)
        if holder:
            lines.append(f"Running now in another process: run #{holder.get('run_id', '?')} "
                         f"(pid {holder.get('pid', '?')})")
    lines += await canary.status_lines() if canary is not None else []
    recent = await runs.store.runs.training_runs(3)
    if recent:
        lines.append("Last runs:")
        lines += [f"  {describe_run(r)}" for r in recent]
    return lines


def approval_text(version: str, result, probes: dict) -> str:
    """What the admins are told about a candidate waiting for /promote: numbers and samples."""
    lines = [f"{version} passed every check and waits for your approval: /promote {version}",
             result.summary()]
    candidate = probes.get("candidate") or []
    if candidate:
        lines.append("Sample replies (probe prompt → candidate):")
        lines += [f"  {p['prompt']} → {(p.get('replies') or [''])[0]}" for p in candidate[:5]]
    return "\n".join(lines)
