"""Parse the learning schedule: an interval like "6h" / "30m" or a 5-field cron line."""
from __future__ import annotations

import re
from dataclasses import dataclass

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Schedule:
    interval_seconds: float | None = None
    cron: str | None = None


def parse_schedule(text: str) -> Schedule:
    """Return the schedule, or raise ValueError saying what forms are accepted."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        if seconds <= 0:
            raise ValueError("the interval must be longer than 0")
        return Schedule(interval_seconds=seconds)
    if len(text.split()) == 5:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(text)  # raises ValueError on a bad field
        return Schedule(cron=text)
    raise ValueError(f"{text!r} is neither an interval (e.g. '6h', '30m') nor a cron line ('0 4 * * *')")
