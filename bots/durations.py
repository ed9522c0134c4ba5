"""How long something took and how many there were, the way people read it: one helper each for /status, run reports, the dashboard and the CLI."""
from __future__ import annotations


def duration(seconds: float | None, missing: str = "?") -> str:
    """42s, 3m 07s, 2h 05m, 3d 04h; `missing` when there is no value."""
    if seconds is None:
        return missing
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {m:02d}m"
    return f"{hours // 24}d {hours % 24:02d}h"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """"1 message", "2 messages" ("person"/"people": pass the plural form)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
