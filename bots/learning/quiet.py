"""Keeping chats fast while the trainer child runs: the engine gives up cores for the run.

On a 2-core machine a niced, single-threaded trainer still takes one core most of the time.
An engine running two torch threads then collapses: every parallel region of every step
waits for the thread that lost its core (measured: a lone chat's 32-token reply went from
0.5 s to 14-20 s). With one thread the engine keeps a core to itself and its replies stay
close to a quiet bot's (docs/BENCHMARKS.md, "while training"). `[engine]
threads_while_training` (default 1; 0 = leave the engine alone) is the thread count for the
run; the engine goes back to `[engine] threads` when the child ends, however it ends.
"""
from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)


@contextlib.contextmanager
def engine_yields_cores(engine, engine_config):
    """Within the block, `engine` runs on engine_config.threads_while_training threads."""
    setter = getattr(engine, "set_threads", None)
    wanted = getattr(engine_config, "threads_while_training", 0)
    if setter is None or wanted <= 0:
        yield
        return
    setter(wanted)
    log.info("trainer running: the engine uses %d thread(s) until it ends", wanted)
    try:
        yield
    finally:
        setter(engine_config.threads)
