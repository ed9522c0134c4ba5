"""Compiling a fast path's layers with TorchScript, or leaving them to Python where that fails.

A decode step is a few hundred to ~750 small ops (GPT-2 124M: ~12 a layer, SmolLM2-135M: ~25 a
layer × 30); in Python each costs a few µs of interpreter around its kernel, in TorchScript's
interpreter less (docs/BENCHMARKS.md, issue 23). The fast paths keep their layers and the code
that runs them in one `nn.Module` written in TorchScript's subset of Python, so the same module
serves compiled or not: a torch that cannot compile it (TorchScript is in maintenance; a build
without it) serves the same ops from Python, with a warning.
"""
from __future__ import annotations

import logging
import sys
import threading
import warnings

import torch
from torch import nn

log = logging.getLogger(__name__)
_compiling = threading.Lock()  # TorchScript registers a class after compiling it: two threads at once (two engines,
# a canary beside the bot) each compiled it, the second under a mangled name its layers then failed to find


def compile_layers(layers: nn.Module, classes: tuple) -> nn.Module:
    """`layers` compiled by TorchScript, or `layers` itself where this torch cannot (same ops; logged).

    classes: the TorchScript classes its attributes hold, compiled first so their objects convert.
    """
    try:
        with _compiling, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script announces its deprecation; it still ships and runs
            for kind in classes:  # names in a class's annotations resolve in its own module (script's default: here)
                torch.jit.script(kind, _rcb=torch._jit_internal.createResolutionCallbackFromEnv(sys.modules[kind.__module__]))
            return torch.jit.script(layers)
    except Exception as exc:  # noqa: BLE001 - any failure to compile keeps the Python code
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("%s not compiled by TorchScript (%s: %s): running it in Python", type(layers).__name__,
                    type(exc).__name__, first_line)
        return layers
