"""The lifecycle every in-process engine shares: one worker thread running `self._run`,
woken through the condition `self._wake`, stopped after what is in flight has finished."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from engine.serving.protocol import EngineBusy, EngineStats, EngineStopped, EngineUnavailable
from engine.types import percentile

log = logging.getLogger(__name__)


def auto_threads() -> int:
    """The engine's threads when `[engine] threads = 0`: one per usable core but one, at least one.

    The core left over is the event loop's (the platform clients, storage, streaming): an
    OpenMP team that spans every core stalls at each parallel region whenever another
    thread of the process (or of the machine) takes one of its cores. On a loaded 2-core
    box a 124M reply took 19 s on two threads and 4.4 s on one (docs/BENCHMARKS.md).
    """
    return max(1, len(usable_cpus()) - 1)


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask; every CPU where there is none)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def resolve(request, result) -> None:
    """From the worker thread: settle a request's `future` on its `loop` with `result` (an exception
    is raised to the awaiting caller), unless it is already done (cancelled: the chat went away)."""
    def _set():
        if not request.future.done():
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)

    request.loop.call_soon_threadsafe(_set)


class WorkerThread:
    """start / stop / `async with` and queue admission for an engine that sets `_wake` (a
    Condition), `_running`, `_thread`, `_queue` and `max_queue` in its constructor and defines
    `_run` (the worker loop)."""

    thread_name = "mynah-engine"
    died: str = ""  # why the worker thread stopped on an error ("" while it serves)

    def start(self) -> None:
        if self._running:
            return
        self._running, self.died = True, ""
        self._thread = threading.Thread(target=self._guarded_run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _guarded_run(self) -> None:
        """`_run`; should it die (a model that cannot be served, a bug), every waiting request fails
        with why at once and later ones are refused (EngineUnavailable: the bot apologises),
        instead of each chat waiting for a reply that never comes."""
        try:
            self._run()
        except BaseException as exc:
            log.exception("the engine's worker thread stopped")
            with self._wake:
                self._running, self.died = False, f"{type(exc).__name__}: {exc}"[:300]
                waiting = list(self._queue)
                self._queue.clear()
            for request in waiting:
                resolve(request, EngineUnavailable(f"the engine stopped: {self.died}"))

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
            if self.died:
                raise EngineUnavailable(f"the engine stopped: {self.died}")
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
