"""Admin-only commands behind a real ACL: /retrain, /status, /rollback, /models, /promote
(the `admin=True` records of bots/chat/commands.py).

Admins are platform user ids listed in config under [admins]; each platform's spec says
where its ids are (a platform without any, the console, makes whoever runs it an admin).
Every attempt, allowed or not, is written to the audit table. /status is answered here;
ChatService binds the others when it is built: /retrain, /rollback and /models from the
learning loop's commands (bots/learning/commands.py), /promote from its trust keeper;
without the loop the commands that need it say so.
"""
from __future__ import annotations

import time

from collections.abc import Mapping

from bots.chat.durable import WriteRetry
from bots.chat.events import Incoming, Outgoing
from bots.durations import duration, plural


# Anonymous group admins (and linked channels) post as the group itself: the id is shared by
# every anonymous admin, so it can prove nobody's identity.
ANONYMOUS_TEXT = ("/{name} needs to know which admin you are, but this message was sent anonymously (on behalf "
                  "of the group). Turn off \"Remain anonymous\" in your admin rights, or ask me in a private chat.")


class AdminCommands:
    def __init__(self, admins: Mapping[str, frozenset[str] | None], store, engine, learning=None, *,
                 writes: WriteRetry | None = None):
        self.admins = dict(admins)   # platform -> admin ids; None: everyone there (bots/platforms/registry.py)
        self.store = store      # storage.store.Store: the audit, and counts for /status
        self.engine = engine
        self.learning = learning
        self.writes = writes or WriteRetry()   # audits survive a locked database
        self.started_at = time.time()
        self.mmi_note = ""      # why MMI is off for this model (bots.app.MMI_OFF_CHAT_TEMPLATE), shown by /status
        self.cluster = None     # bots.cluster.Presence when several workers share the database

    def is_admin(self, platform: str, user_id: str) -> bool:
        if platform in self.admins and self.admins[platform] is None:
            return True
        return str(user_id) in (self.admins.get(platform) or ())

    async def handle(self, name: str, args: list[str], msg: Incoming, handler=None) -> list[Outgoing]:
        """ACL and audit, then `handler` (bound from the command table; None: not available)."""
        allowed = self.is_admin(msg.platform, msg.user_id) and not msg.anonymous
        audit = lambda: self.store.audit.record(msg.platform, msg.user_id, name, " ".join(args), allowed)  # noqa: E731
        await self.writes.run(f"audit of /{name}", audit)
        if msg.anonymous:
            return [Outgoing(ANONYMOUS_TEXT.format(name=name), ephemeral=True)]
        if not allowed:
            return [Outgoing(f"Sorry, /{name} is for the bot's admins only.", ephemeral=True)]
        if handler is None:
            return [Outgoing(f"/{name} is not available yet: the learning loop is not running.", ephemeral=True)]
        answers = await handler(args, msg)
        for out in answers:     # admin output (status, models, runs) is for the admin, not the group
            out.private = True
        return answers

    async def command_status(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return [Outgoing(await self.status_text(), ephemeral=True)]

    async def status_text(self) -> str:
        stats = self.engine.stats()  # engine.serving.protocol.EngineStats
        counts = await self.store.messages.stats()
        mmi = stats.mmi
        round_trip = f", last round trip {_secs(stats.backend_latency_s)}" if stats.backend != "local" else ""
        lines = [
            f"Model version: {stats.model_version}",
            f"Backend: {stats.backend}: {stats.health}{round_trip}",
            f"Queue: {stats.queue_depth} waiting, {stats.active} generating",
            f"Reply latency: p50 {_secs(stats.latency_p50_s)}, p95 {_secs(stats.latency_p95_s)} "
            f"over {plural(stats.replies, 'reply')}",
            f"MMI reranking: on ({mmi.candidates} candidates, weight {mmi.weight:g}, "
            f"backward model {mmi.backward_model})" if mmi else
            f"MMI reranking: off{f' ({self.mmi_note})' if self.mmi_note else ''}",
            f"Uptime: {duration(time.time() - self.started_at)}",
            f"Stored: {plural(counts.get('chats', 0), 'chat')}, {plural(counts.get('messages', 0), 'message')}",
        ]
        if self.learning is not None:
            lines += await self.learning.status_lines()
        if self.cluster is not None:
            lines += await self.cluster.status_lines()
        return "\n".join(lines)


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}s"
