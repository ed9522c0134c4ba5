"""What this CPU is, as /proc/cpuinfo says: read once, shared by the kernel choices and the benchmark.

Only the first processor's block is read (every core of a box is the same kind here), so a
many-core machine's long file is not scanned whole.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def first_processor(path: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields ("vendor_id", "model name", "flags" or on Arm "Features", …);
    {} where the file cannot be read (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def vendor() -> str:
    """"GenuineIntel", "AuthenticAMD", … or "unknown"."""
    return first_processor().get("vendor_id", "unknown")


def model_name() -> str:
    return first_processor().get("model name", "")


def flags() -> set[str]:
    """The CPU's feature flags (x86 "flags", Arm "Features")."""
    info = first_processor()
    return set((info.get("flags") or info.get("Features") or "").split())
