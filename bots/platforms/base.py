"""What every front end is: a `Platform` the composition root can start, stop and hand
messages to (the shape of AstrBot's platform adapters).

A platform turns its own events into `Incoming`, asks the shared `ChatService` what to
say, and sends each `Outgoing` back. `notify` delivers what nobody just asked for (a
retrain result); the composition root registers it with the learning loop, so a platform
never goes looking for the loop itself.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from bots.chat.events import Outgoing


class Platform(ABC):
    name: ClassVar[str]      # "telegram", "discord", "console": the Incoming.platform it produces
    # Set by the runner before start(): called with a reason when the platform cannot go on
    # (e.g. a second instance polls the same Telegram token) and the process should stop.
    on_fatal: Callable[[str], None] | None = None

    @abstractmethod
    async def start(self) -> None:
        """Connect and start taking messages; raise PlatformStartError with what to fix."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop taking messages, let replies in flight finish, disconnect."""

    @abstractmethod
    async def send(self, target: Any, out: Outgoing, **options: Any) -> list:
        """Send one Outgoing to `target` (the platform's chat / channel), split to the
        platform's limit; mark it delivered or failed. Returns what was sent."""

    @abstractmethod
    async def notify(self, chat_id: str, out: Outgoing, thread_id: str = "") -> None:
        """Deliver something nobody just asked for to a chat (and thread / topic) by id."""
