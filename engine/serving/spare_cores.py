"""How many of this process's cores nothing else is using: the threads a prefill may take.

A burst's first words wait on its prefill, which is arithmetic. On a 2-core box the engine
decodes on one thread (the other core is the event loop's: worker.auto_threads), but while a
prefill runs the event loop is mostly idle, and a prefill on both cores took 0.55-0.75x the
time (docs/BENCHMARKS.md, fourteenth pass). Next to a busy process (a CPU hog, a trainer, a
second bot) the same two-thread prefill took 1.6-2x as long as one thread, because each
parallel region then waits for the thread that lost its core; next to a saturated event loop
in this process (a flood) it was slower too. So the engine spreads a prefill only over cores
that are idle by the kernel's own counters, for the CPUs this process may run on:

- other processes: /proc/stat's busy time minus this whole process's CPU time, over the last
  second or so (a trainer that starts shows at once);
- this process's other threads (the event loop, storage): its CPU time minus the engine
  worker's and minus what the prefill's own helper threads used, over the last few seconds:
  a burst's intake (a tenth of a second of the loop's time just before its prefill) and a busy
  bot's streaming (0.1-0.2 of a core) do not count as load, a loop kept busy beyond that does.

Where there is no /proc (not Linux), nothing is spread.
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
from pathlib import Path

from engine.serving.worker import usable_cpus

WINDOW_S = 0.5        # a sample is kept at most this often
OWN_WINDOW_S = 5.0    # this process's other threads are judged over about this long
STALE_S = 10.0        # samples further apart than this say nothing about now: start again
HEADROOM = 0.25       # of a core: less use than this still leaves it free
OWN_SHARE = 0.3       # of a core: the event loop's ordinary share in a busy bot (streaming 16 chats: 0.1-0.2)


class SpareCores:
    """Samples the counters (`tick`, cheap: one small read at most every WINDOW_S) and says how many
    threads a prefill may use now (`threads`). Called from the engine's worker thread only.

    `proc`: the /proc folder; `process_cpu` / `thread_cpu`: this process's and the calling (worker)
    thread's CPU seconds (tests give their own)."""

    def __init__(self, proc: str | os.PathLike = "/proc", cpus: set[int] | None = None, clock=time.monotonic,
                 process_cpu=time.process_time, thread_cpu=time.thread_time):
        self.proc = Path(proc)
        self.cpus = cpus if cpus is not None else usable_cpus()
        self.clock, self.process_cpu, self.thread_cpu = clock, process_cpu, thread_cpu
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100   # /proc/stat's ticks per second
        self.helpers_s = 0.0  # CPU seconds the spread prefills' helper threads used (not the event loop's)
        self._samples: collections.deque = collections.deque()   # (when, busy s on our CPUs, process s, worker s, helpers s)
        self.others = None    # cores counted as taken at the last judgement (None: unknown)

    def _sample(self) -> tuple | None:
        try:
            stat = (self.proc / "stat").read_text()
        except OSError:
            return None
        busy = 0
        for line in stat.splitlines():
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu":
                continue
            try:
                cpu = int(name[3:])
                fields = [int(v) for v in rest.split()]
            except ValueError:
                continue
            if cpu in self.cpus and len(fields) >= 4:
                # user nice system idle iowait irq softirq steal …; guest time is already in user and nice
                busy += sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        return self.clock(), busy / self.hz, self.process_cpu(), self.thread_cpu(), self.helpers_s

    def tick(self) -> None:
        """Keep recent samples (the worker calls this on every pass of its loop; it samples every WINDOW_S)."""
        now = self.clock()
        if self._samples and now - self._samples[-1][0] < WINDOW_S:
            return
        sample = self._sample()
        if sample is None:
            return
        if self._samples and now - self._samples[-1][0] > STALE_S:
            self._samples.clear()
        self._samples.append(sample)
        while len(self._samples) > 2 and now - self._samples[1][0] >= OWN_WINDOW_S:
            self._samples.popleft()

    @contextlib.contextmanager
    def spreading(self):
        """Around a spread prefill: the process's CPU time beyond the worker's then is the helper threads'."""
        process, worker = self.process_cpu(), self.thread_cpu()
        try:
            yield
        finally:
            self.helpers_s += max(0.0, (self.process_cpu() - process) - (self.thread_cpu() - worker))

    def threads(self, base: int, most: int) -> int:
        """Threads for a prefill now: `base` (the decode threads) plus the cores nothing else used,
        at most `most`; `base` where that cannot be told."""
        if most <= base or len(self.cpus) <= base:
            return base
        self.tick()
        now = self._sample()
        recent = [] if now is None else [s for s in self._samples if 0.4 <= now[0] - s[0] <= STALE_S]
        if not recent:
            self.others = None   # no window yet (the first prefill after start-up)
            return base
        short, long = recent[-1], recent[0]
        elapsed = now[0] - short[0]
        other_processes = ((now[1] - short[1]) - (now[2] - short[2])) / elapsed
        own_elapsed = now[0] - long[0]
        own_threads = ((now[2] - long[2]) - (now[3] - long[3]) - (now[4] - long[4])) / own_elapsed
        self.others = max(0.0, other_processes) + max(0.0, own_threads - OWN_SHARE)
        free = int(len(self.cpus) - self.others + HEADROOM)
        return max(base, min(most, free))
