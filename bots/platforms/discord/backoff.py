"""A bounded reconnect wait for discord.py.

discord.py waits a random 0 … 2^n seconds between reconnect attempts, n growing to 10: after a
minute of network trouble its next wait can be 17 minutes, so a bot whose network came back stays
silent that long. Mynah keeps the jitter but caps the wait at 2^5 = 32 s, so it is back within
half a minute of Discord being reachable. Installed once, before any client connects.
"""
from __future__ import annotations

import discord.client
import discord.shard
from discord.backoff import ExponentialBackoff

MAX_EXPONENT = 5   # waits of at most 2**5 = 32 s


class BoundedBackoff(ExponentialBackoff):
    """discord.py's backoff with the exponent stopped at MAX_EXPONENT."""

    def __init__(self, base: int = 1, *, integral: bool = False):
        super().__init__(base, integral=integral)
        self._max = MAX_EXPONENT


def bound_reconnect_waits() -> None:
    """Make the client's and each shard's reconnect loop use BoundedBackoff."""
    discord.client.ExponentialBackoff = BoundedBackoff
    discord.shard.ExponentialBackoff = BoundedBackoff
