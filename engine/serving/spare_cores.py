"""How many of this process's cores no other process is using: the threads a prefill may take.

A burst's first words wait on its prefill, which is arithmetic. On a 2-core box the engine
decodes on one thread (the other core is the event loop's: worker.auto_threads), but while a
prefill runs the event loop is mostly idle, and a prefill on both cores took 0.55-0.65x the
time (docs/BENCHMARKS.md, fourteenth pass). Next to a busy process (a CPU hog, a trainer, a
second bot) the same two-thread prefill took 1.6-2x as long as one thread, because each
parallel region then waits for the thread that lost its core. So the engine spreads a prefill
only over cores that other processes left idle, judged from the kernel's own counters over the
last second or so: /proc/stat (busy time per CPU) minus this process's time (/proc/self/stat),
for the CPUs this process may run on. Where there is no /proc (not Linux), nothing is spread.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

WINDOW_S = 0.5        # a sample is kept at most this often; a judgement covers the last one to two windows
STALE_S = 5.0         # a sample older than this says nothing about now: take a fresh one and judge the next prefill
HEADROOM = 0.25       # of a core: others using less than this much of one still leave it free


class SpareCores:
    """Samples the CPU counters (`tick`, cheap: two small reads, at most every WINDOW_S) and says how
    many threads a prefill may use now (`threads`). `proc`: the /proc folder (tests point it elsewhere)."""

    def __init__(self, proc: str | os.PathLike = "/proc", cpus: set[int] | None = None,
                 clock=time.monotonic):
        self.proc = Path(proc)
        self.cpus = cpus if cpus is not None else _usable_cpus()
        self.clock = clock
        self._older: tuple[float, float, float] | None = None   # (when, busy ticks on our CPUs, our ticks)
        self._newer: tuple[float, float, float] | None = None
        self.others = None   # cores other processes used over the last judgement (None: unknown)
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100   # /proc's ticks per second

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            stat = (self.proc / "stat").read_text()
            own = (self.proc / "self" / "stat").read_text()
        except OSError:
            return None
        busy = 0.0
        for line in stat.splitlines():
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu":
                continue
            try:
                cpu = int(name[3:])
            except ValueError:
                continue
            if cpu not in self.cpus:
                continue
            fields = [int(v) for v in rest.split()]
            # user nice system idle iowait irq softirq steal …; guest time is already in user and nice
            busy += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        try:  # the command name may hold spaces and parentheses: fields after the last ')'
            after = own[own.rindex(")") + 2:].split()
            ours = float(int(after[11]) + int(after[12]))   # utime, stime (fields 14 and 15)
        except (ValueError, IndexError):
            return None
        return self.clock(), busy, ours

    def tick(self) -> None:
        """Keep a recent sample (the worker calls this while idle and before each prefill)."""
        now = self.clock()
        if self._newer is not None and now - self._newer[0] < WINDOW_S:
            return
        sample = self._sample()
        if sample is None:
            return
        if self._newer is not None and now - self._newer[0] < STALE_S:
            self._older = self._newer
        else:
            self._older = None
        self._newer = sample

    def threads(self, base: int, most: int) -> int:
        """Threads for a prefill now: `base` (the decode threads) plus the cores other processes left
        idle, at most `most`; `base` where that cannot be told."""
        if most <= base or len(self.cpus) <= base:
            return base
        self.tick()
        now = self._sample()
        start = self._older or self._newer
        if now is None or start is None or not 0.05 <= now[0] - start[0] <= 2 * STALE_S:
            self.others = None   # too short a window to tell (the first prefill after start-up)
            return base
        elapsed_ticks = (now[0] - start[0]) * self.hz
        self.others = max(0.0, ((now[1] - start[1]) - (now[2] - start[2])) / elapsed_ticks)
        free = int(len(self.cpus) - self.others + HEADROOM)
        return max(base, min(most, free))


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no /proc either; threads() then keeps the base
        return set(range(os.cpu_count() or 1))
