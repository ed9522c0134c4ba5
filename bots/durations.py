"""Durations and counts the way people read them: one place for /status, run reports, the
dashboard and the command line ("1 version", not "1 versions")."""
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


def plural(n: int, word: str, many: str | None = None) -> str:
    """"1 message", "2 messages"; `many` for irregular words (1 reply, 2 replies)."""
    if many is None:
        many = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"
    return f"{n} {word if n == 1 else many}"
