"""A prefill spreads over the cores other processes leave idle, and only those (engine/serving/spare_cores.py).

The judgement is read from the kernel's counters; the tests write those counters (a /proc
folder of their own) or make a real busy process, and check the engine's tokens do not depend
on how many threads ran the prefill. No timings here (docs/BENCHMARKS.md has them).
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from bots.config import ConfigError, load_config
from engine.model import load_model
from engine.serving.batcher import Engine
from engine.serving.sampling import SamplingParams
from engine.serving.spare_cores import SpareCores

HZ = os.sysconf("SC_CLK_TCK")


class FakeProc:
    """A /proc/stat (per-CPU busy and idle ticks), this process's and its worker thread's CPU seconds, and a clock.
    The engine's worker runs on CPU 0; the event loop and a spread prefill's helper thread on CPU 1."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root, self.now = root, 100.0
        self.busy, self.idle = [0] * cpus, [0] * cpus
        self.process_s = self.worker_s = 0.0
        root.mkdir(parents=True)
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for i, (busy, idle) in enumerate(zip(self.busy, self.idle)):
            # user nice system idle iowait irq softirq steal guest guest_nice: busy split over user and steal
            lines.append(f"cpu{i} {busy - busy // 4} 0 0 {idle} 0 0 0 {busy // 4} 0 0")
        (self.root / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\nctxt 5\n")

    def advance(self, seconds: float, others: dict[int, float] | None = None, *, worker: float = 0.0,
                loop: float = 0.0, helper: float = 0.0) -> None:
        """`seconds` pass; CPU i is busy others[i] of them, plus this process's threads (fractions of a CPU)."""
        used = dict(others or {})
        used[0] = used.get(0, 0.0) + worker
        used[1] = used.get(1, 0.0) + loop + helper
        for i in range(len(self.busy)):
            self.busy[i] += round(used.get(i, 0.0) * seconds * HZ)
            self.idle[i] += round((1 - used.get(i, 0.0)) * seconds * HZ)
        self.process_s += (worker + loop + helper) * seconds
        self.worker_s += worker * seconds
        self.now += seconds
        self.write()


@pytest.fixture
def proc(tmp_path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def cores(proc: FakeProc, cpus=(0, 1)) -> SpareCores:
    spare = SpareCores(proc.root, cpus=set(cpus), clock=lambda: proc.now, process_cpu=lambda: proc.process_s,
                       thread_cpu=lambda: proc.worker_s)
    spare.tick()
    return spare


def test_idle_cores_are_taken_and_a_busy_one_is_left_alone(proc):
    spare = cores(proc)
    proc.advance(1.0)
    assert spare.threads(1, 8) == 2            # nobody else on either CPU
    proc.advance(1.0, others={1: 0.9})
    assert spare.threads(1, 8) == 1            # a busy process on the second: the prefill stays on one thread
    assert spare.others == pytest.approx(0.9, abs=0.05)
    proc.advance(1.0, others={0: 0.1})
    assert spare.threads(1, 8) == 2            # a little background work does not count
    proc.advance(1.0, others={0: 0.3, 1: 0.3})
    assert spare.threads(1, 8) == 1            # but over a quarter of a core does


def test_the_engine_its_helpers_and_a_burst_intake_are_not_load(proc):
    spare = cores(proc)
    for _ in range(8):                          # seconds of decoding, with spread prefills now and then
        proc.advance(0.5, worker=1.0, helper=0.5, loop=0.02)
        spare.helpers_s += 0.25                 # what `spreading()` measured around those prefills
        spare.tick()
    proc.advance(0.5, worker=0.05, loop=0.3)    # a burst's 16 updates stored just before its prefill
    assert spare.threads(1, 8) == 2
    for _ in range(12):                         # a busy bot streaming to many chats
        proc.advance(0.5, worker=1.0, loop=0.25)
        spare.tick()
    assert spare.threads(1, 8) == 2


def test_an_event_loop_kept_busy_is_load(proc):
    spare = cores(proc)
    for _ in range(12):                         # a flood: the loop busy for seconds
        proc.advance(0.5, worker=0.2, loop=0.7)
        spare.tick()
    assert spare.threads(1, 8) == 1
    assert spare.others == pytest.approx(0.7 - 0.3, abs=0.1)   # beyond the loop's ordinary share


def test_spreading_counts_the_helper_threads_time(proc):
    spare = cores(proc)
    with spare.spreading():
        proc.advance(0.2, worker=1.0, helper=0.9)
    assert spare.helpers_s == pytest.approx(0.18)


def test_only_the_cpus_this_process_may_run_on_count(tmp_path):
    proc = FakeProc(tmp_path / "proc", cpus=4)
    spare = cores(proc, cpus=(0, 1))
    proc.advance(1.0, others={2: 1.0, 3: 1.0})          # busy, but not where this process runs
    assert spare.threads(1, 8) == 2
    proc.advance(1.0, others={1: 1.0})
    assert spare.threads(1, 8) == 1


def test_the_most_threads_and_the_base_bound_the_answer(proc):
    spare = cores(proc)
    proc.advance(1.0)
    assert spare.threads(1, 1) == 1            # [engine] prefill_threads = 1 (or <= threads): never spread
    assert spare.threads(2, 8) == 2            # the decode threads already take every core
    proc.advance(1.0, others={0: 1.0, 1: 1.0})
    assert spare.threads(2, 8) == 2            # never fewer than the decode threads


def test_without_a_window_or_without_proc_nothing_is_spread(proc, tmp_path):
    spare = SpareCores(proc.root, cpus={0, 1}, clock=lambda: proc.now, process_cpu=lambda: proc.process_s,
                       thread_cpu=lambda: proc.worker_s)
    assert spare.threads(1, 8) == 1 and spare.others is None          # first look: no window yet
    proc.advance(10 * 60)
    assert spare.threads(1, 8) == 1                                   # a stale sample says nothing about now
    proc.advance(0.6)
    assert spare.threads(1, 8) == 2                                   # …and is replaced
    gone = SpareCores(tmp_path / "no-proc", cpus={0, 1})
    gone.tick()
    assert gone.threads(1, 8) == 1                                    # not Linux, or /proc unreadable


def _spin(cpu: int, stop) -> None:
    os.sched_setaffinity(0, {cpu})
    while not stop.is_set():
        pass


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_a_real_busy_process_on_our_cpus_keeps_a_prefill_off_them():
    """Busy processes pinned on two of this process's CPUs: a judgement over those two CPUs leaves the
    prefill on one thread (on a loaded machine the more so: the others only get busier)."""
    pair = sorted(os.sched_getaffinity(0))[:2]
    stop = multiprocessing.get_context("spawn").Event()
    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, args=(cpu, stop), daemon=True) for cpu in pair]
    for s in spinners:
        s.start()
    try:
        time.sleep(1.0)   # the spinners are running
        spare = SpareCores(cpus=set(pair))
        spare.tick()
        time.sleep(1.0)
        assert spare.threads(1, 2) == 1, f"others used {spare.others} cores"
        assert spare.others > 1.0
    finally:
        stop.set()
        for s in spinners:
            s.join(10)


def greedy(n: int) -> dict:
    return dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, repetition_penalty=1.0, finish_sentences=False)


PROMPTS = [[("user", t)] for t in ["hello there", "what do you like to do ?", "i live in a big city and i like it",
                                   "good night my dear friend , see you later"]]


async def _burst(loaded, spread: bool) -> tuple[list[str], dict]:
    async with Engine(loaded, SamplingParams(), max_batch_size=8, threads=1,
                      prefill_threads=0 if spread else 1) as engine:
        if spread:   # this machine's load must not decide the test: judge every core idle
            engine._spare.threads = lambda base, most: max(base, min(most, 2))
        texts = [r.text for r in await asyncio.gather(*[engine.reply(p, greedy(10)) for p in PROMPTS])]
        return texts, dict(engine.timing)


@pytest.mark.parametrize("quantize", ["none", "int8"])
async def test_a_prefill_spread_over_two_threads_gives_the_same_tokens(tiny_dialogpt, quantize):
    loaded = load_model(str(tiny_dialogpt), quantize=quantize)
    alone, one = await _burst(loaded, spread=False)
    spread, two = await _burst(loaded, spread=True)
    assert spread == alone
    assert one["spread_prefills"] == 0 and one["prefill_threads"] == 1
    assert two["spread_prefills"] >= 1 and two["prefill_threads"] == 2
    assert two["decode_threads"] == 1          # the decode steps went back to the decode threads


async def test_a_llama_prefill_spread_over_two_threads_gives_the_same_tokens(tmp_path):
    from tests.test_fastpath_llama import build

    loaded = load_model(str(build(tmp_path / "llama", "llama")))
    alone, _ = await _burst(loaded, spread=False)
    spread, two = await _burst(loaded, spread=True)
    assert spread == alone and two["spread_prefills"] >= 1


def test_prefill_threads_must_not_be_negative(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[engine]\nprefill_threads = -1\n")
    with pytest.raises(ConfigError, match="prefill_threads"):
        load_config(path)
