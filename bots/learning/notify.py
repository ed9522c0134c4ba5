"""Who hears about a run: per-platform notifiers and progress listeners.

Adapters register `async fn(chat_id, Outgoing)` for their platform so a run's result
(numbers + loss-curve picture) reaches the chat that asked for it, in its thread when it
had one. The console prints results until a console adapter registers its own notifier.
A notifier or listener that fails is logged and skipped: telling people never fails a run.
"""
from __future__ import annotations

import logging
from typing import Awaitable, Callable

from bots.chat.events import Outgoing
from engine.training.events import Event

log = logging.getLogger(__name__)

Notifier = Callable[..., Awaitable[None]]   # async fn(chat_id, Outgoing[, thread_id=...])
ProgressListener = Callable[[Event], None]


def configured_targets(notify: list[str]) -> list[tuple]:
    """[learning] notify entries, "platform:chat" or "platform:chat:thread", as tuples."""
    return [tuple(str(t).split(":", 2)) for t in notify]


async def _print_notice(chat_id: str, out: Outgoing, thread_id: str = "") -> None:
    print(f"mynah> {out.text}" + (f"\n(loss curve: {out.image})" if out.image else ""), flush=True)


class Notifiers:
    def __init__(self):
        self._by_platform: dict[str, list[Notifier]] = {"console": [_print_notice]}
        self._console_default = True
        self._listeners: list[ProgressListener] = []

    def add(self, platform: str, fn: Notifier) -> None:
        if platform == "console" and self._console_default:
            self._by_platform["console"] = []
            self._console_default = False
        self._by_platform.setdefault(platform, []).append(fn)

    def add_listener(self, fn: ProgressListener) -> None:
        self._listeners.append(fn)

    async def notify(self, targets: list[tuple], out: Outgoing) -> None:
        """Send `out` to each (platform, chat_id[, thread_id]) through that platform's notifiers."""
        for platform, chat_id, *rest in targets:
            thread = rest[0] if rest else ""
            fns = self._by_platform.get(platform) or []
            if not fns:
                log.info("no %s notifier registered; result for chat %s:\n%s", platform, chat_id, out.text)
            for fn in fns:
                try:
                    if thread:
                        await fn(str(chat_id), out, thread_id=str(thread))
                    else:
                        await fn(str(chat_id), out)
                except Exception:
                    log.exception("could not tell %s chat %s about the run", platform, chat_id)

    def progress(self, event: Event) -> None:
        """Hand a progress event to every listener."""
        for fn in self._listeners:
            try:
                fn(event)
            except Exception:
                log.exception("a progress listener failed")
