"""Keeping chats fast while the trainer child runs.

On a 2-core machine a niced, single-threaded trainer still takes one core most of the time.
An engine running two torch threads then collapses: every parallel region of every step
waits for the thread that lost its core (measured through a chat platform: a lone chat's 32-token
reply went from 0.5 s to 14-20 s). Two measures (docs/BENCHMARKS.md measures both):

- `[learning] pause_trainer_while_chatting` (default true): while the engine is answering
  (from the moment a message reaches an idle engine until it is idle again) the trainer's
  process group is stopped (SIGSTOP) and continued (SIGCONT) afterwards, so chats get the
  whole machine. Training takes longer by the time the bot spends answering; a bot that is
  never idle trains only as far as `[learning] max_minutes` of wall time allow.
- `[engine] threads_while_training` (default 0 = leave the engine alone; 1 is the choice
  when pausing is off or POSIX signals are unavailable): the engine's torch threads while
  the child runs. It goes back to `[engine] threads` when the child ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal

log = logging.getLogger(__name__)


class TrainerQuiet:
    """What the learning loop does to the engine and the trainer child for one run."""

    def __init__(self, engine, engine_config, pause: bool):
        self.engine = engine
        self.engine_config = engine_config
        self.pause = pause and hasattr(signal, "SIGSTOP") and engine is not None \
            and hasattr(engine, "set_busy_hook")
        self.pid: int | None = None
        self.paused = 0  # how many times the child was stopped for chats

    def started(self, pid: int) -> None:
        """The child is running: from now on it is stopped whenever the engine works."""
        self.pid = pid
        if self.pause:
            self.engine.set_busy_hook(self._busy)

    def _busy(self, busy: bool) -> None:  # called from the engine's worker thread
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, signal.SIGSTOP if busy else signal.SIGCONT)
            self.paused += busy
        except (ProcessLookupError, PermissionError):
            self.pid = None

    def ended(self) -> None:
        if self.pause:
            self.engine.set_busy_hook(None)
        pid, self.pid = self.pid, None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGCONT)  # never leave a stopped child behind


@contextlib.contextmanager
def engine_yields_cores(engine, engine_config, learning_config=None):
    """Within the block: the engine on threads_while_training threads; `quiet.started(pid)` pauses the child for chats."""
    quiet = TrainerQuiet(engine, engine_config, getattr(learning_config, "pause_trainer_while_chatting", False))
    setter = getattr(engine, "set_threads", None)
    wanted = getattr(engine_config, "threads_while_training", 0)
    if setter is not None and wanted > 0:
        setter(wanted)
        log.info("trainer running: the engine uses %d thread(s) until it ends", wanted)
    try:
        yield quiet
    finally:
        quiet.ended()
        if setter is not None and wanted > 0:
            setter(engine_config.threads)
