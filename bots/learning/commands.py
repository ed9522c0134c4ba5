"""The learning loop's admin commands (/retrain, /rollback, /models), after bots/chat/admin.py's
ACL and audit; /promote is bots/learning/trust.Trust.command_promote."""
from __future__ import annotations

import time

from bots.chat.events import Incoming, Outgoing
from bots.learning import report
from bots.learning.runs import AlreadyRunning, Runs
from bots.learning.versions import Versions
from engine.registry import RegistryError


class LearningCommands:
    def __init__(self, lc, runs: Runs, versions: Versions):
        self.lc = lc
        self.runs = runs
        self.versions = versions

    async def retrain(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        who = f"{msg.platform}:{msg.user_id}" + (f" ({msg.user_name})" if msg.user_name else "")
        privately = msg.can_answer_privately and not msg.is_private   # admin output: to the admin's private chat
        target = (msg.platform, str(msg.user_id), "") if privately else (msg.platform, str(msg.chat_id), msg.thread_id)
        try:
            run_id = await self.runs.start(who, force=True, notify_to=[target])
        except AlreadyRunning as exc:
            since = exc.holder.get("since")
            ago = f", started {report.duration(time.time() - since)} ago" if since else ""
            return [Outgoing(f"Not started: {exc}{ago}. /status shows its progress.", ephemeral=True)]
        where = "to you privately" if privately else "here"
        return [Outgoing(f"Retrain started: run #{run_id}. I'll post the result {where} when it ends "
                         f"(training is capped at {self.lc.max_minutes:g} min, evaluation comes on top).",
                         ephemeral=True)]

    async def rollback(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        try:
            version, old = await self.versions.rollback(args[0] if args else None, who=f"{msg.platform}:{msg.user_id}")
        except RegistryError as exc:
            return [Outgoing(f"Rollback failed: {exc}", ephemeral=True)]
        await self.versions.sync()
        text = f"Rolled back: now serving {version.name} (was {old})."
        running = self.runs.running
        if running is not None:
            text += f" Run #{running.run_id} is still training from {old}; its candidate will not be promoted."
        return [Outgoing(text, ephemeral=True)]

    async def models(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return [Outgoing(await self.versions.models_text(), ephemeral=True)]
