"""The lifecycle every in-process engine shares: one worker thread running `self._run`,
woken through the condition `self._wake`, stopped after what is in flight has finished."""
from __future__ import annotations

import asyncio
import os
import threading
import time

from engine.serving.protocol import EngineBusy, EngineStats, EngineStopped
from engine.types import percentile


def auto_threads() -> int:
    """The engine's threads when `[engine] threads = 0`: one per usable core but one, at least one.

    The core left over is the event loop's (the platform clients, storage, streaming): an
    OpenMP team that spans every core stalls at each parallel region whenever another
    thread of the process (or of the machine) takes one of its cores. On a loaded 2-core
    box a 124M reply took 19 s on two threads and 4.4 s on one (docs/BENCHMARKS.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class WorkerThread:
    """start / stop / `async with` and queue admission for an engine that sets `_wake` (a
    Condition), `_running`, `_thread`, `_queue` and `max_queue` in its constructor and defines
    `_run` (the worker loop)."""

    thread_name = "mynah-engine"

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish what is in flight, then stop the worker."""
        with self._wake:
            self._running = False
            self._wake.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def _admit(self, request):
        """Queue `request` (it has a `future`) for the worker and await its reply; EngineStopped
        when stopped, EngineBusy when max_queue requests already wait."""
        with self._wake:
            if not self._running:
                raise EngineStopped("the engine is not running")
            if len(self._queue) >= self.max_queue:
                raise EngineBusy(f"{len(self._queue)} requests are already waiting")
            self._queue.append(request)
            gate = getattr(self, "admission", None)
            if gate is not None:
                gate.queued()   # this update's hold (admission.py) is released: it reached the engine
            self._wake.notify()
        return await request.future

    @property
    def model(self):
        """The LoadedModel being served (`_loaded`)."""
        return self._loaded

    @property
    def version(self) -> str:
        return self._loaded.version

    def stats(self) -> EngineStats:
        """The queue and the latencies (the engine keeps `_latencies`, `_active`, `replies_served`, `started_at`)."""
        latencies = list(self._latencies)
        return EngineStats(model_version=self.version, queue_depth=len(self._queue), active=self._active,
                           replies=self.replies_served, latency_p50_s=percentile(latencies, 0.5),
                           latency_p95_s=percentile(latencies, 0.95), uptime_s=time.time() - self.started_at)

    async def __aenter__(self):
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
