"""Which chat the reply being generated is for, without widening the engine's interface.

ChatService sets `current_chat` (the chats.id) once the user's message is stored; an engine
that routes per chat (bots/learning/canary.Router: the canary serves a share of chats)
reads it. A context variable belongs to the asyncio task, so concurrent chats never see
each other's value, and every other engine simply ignores it.
"""
from __future__ import annotations

from contextvars import ContextVar

current_chat: ContextVar[int | None] = ContextVar("mynah_current_chat", default=None)
