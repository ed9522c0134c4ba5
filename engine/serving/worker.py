"""The lifecycle every in-process engine shares: one worker thread running `self._run`,
woken through the condition `self._wake`, stopped after what is in flight has finished."""
from __future__ import annotations

import asyncio
import os
import threading


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
    """start / stop / `async with` for an engine that sets `_wake` (a Condition), `_running`
    and `_thread` in its constructor and defines `_run` (the worker loop)."""

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

    async def __aenter__(self):
        self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
