"""The lifecycle every in-process engine shares: one worker thread running `self._run`,
woken through the condition `self._wake`, stopped after what is in flight has finished."""
from __future__ import annotations

import asyncio
import threading


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
