"""The chat logic every platform shares: when to answer, commands, rate limit, and the
path of a message: log it, build the context, generate, log the reply.

The user's message is stored before generation starts, so a crash never loses it; the
reply is stored as "pending" and the adapter marks it sent or failed.
"""
from __future__ import annotations

import logging

from bots.chat.admin import ADMIN_COMMANDS, AdminCommands
from bots.chat.events import Incoming, Outgoing
from bots.chat.ratelimit import RateLimiter
from engine.serving.batcher import EngineBusy, EngineStopped

log = logging.getLogger(__name__)

USER_COMMANDS = {
    "start": "say hello",
    "help": "what I can do",
    "reset": "start our conversation afresh",
    "forget": "delete everything you have said to me",
    "optout": "keep this chat out of my training",
    "optin": "let this chat help me learn again",
}

BUSY_TEXT = "I'm a bit busy right now. Please try again in a moment."
ERROR_TEXT = "Sorry, something went wrong on my side. Please try again."
NON_TEXT_TEXT = "I can only read text messages for now."


def parse_command(text: str) -> tuple[str, list[str], str] | None:
    """'/cmd@bot a b' -> ('cmd', ['a', 'b'], 'bot'); None when it is not a command."""
    if not text.startswith("/") or len(text) < 2:
        return None
    head, *args = text.split()
    name, _, target = head[1:].partition("@")
    return name.lower(), args, target


def help_text(is_admin: bool) -> str:
    lines = ["I'm Mynah, a chatty bot that learns from our conversations. Just talk to me!", ""]
    lines += [f"/{name} - {what}" for name, what in USER_COMMANDS.items()]
    if is_admin:
        lines += ["", "Admin:"] + [f"/{name} - {what}" for name, what in ADMIN_COMMANDS.items()]
    return "\n".join(lines)


class ChatService:
    def __init__(self, config, engine, conversations, learning=None):
        self.config = config
        self.engine = engine
        self.conversations = conversations
        self.admin = AdminCommands(config.admins, conversations, engine, learning)
        self.limiter = RateLimiter(config.chat.rate_limit_messages, config.chat.rate_limit_seconds)

    # ---- entry point --------------------------------------------------------------
    async def handle(self, msg: Incoming, *, on_logged=None) -> list[Outgoing]:
        """Everything the bot says back to one incoming message (often nothing).

        `on_logged()`, when given, is called as soon as the user's message is stored, before
        generation starts: an adapter may acknowledge the platform's delivery from then on."""
        if msg.kind != "text" or msg.text is None:
            return [Outgoing(NON_TEXT_TEXT, reply_to=msg.message_id)] if msg.is_private else []
        text = msg.text.strip()
        if not text:
            return []
        command = parse_command(text)
        if command is not None:
            return await self._command(*command[:2], msg)
        if not self.should_answer(msg):
            return []
        return await self._converse(msg, text, on_logged)

    def should_answer(self, msg: Incoming) -> bool:
        if msg.is_private or msg.answer_all or self.config.chat.answer_all_in_groups:
            return True
        return msg.mentions_bot or msg.reply_to_bot

    async def delivered(self, out: Outgoing, platform_message_id: str | None) -> None:
        if out.stored_id is not None:
            await self.conversations.set_status(out.stored_id, "ok", platform_message_id=platform_message_id)

    async def failed(self, out: Outgoing) -> None:
        if out.stored_id is not None:
            await self.conversations.set_status(out.stored_id, "failed")

    # ---- conversation -----------------------------------------------------------
    async def _chat_id(self, msg: Incoming) -> int:
        return await self.conversations.chat(msg.platform, msg.chat_id, thread_id=msg.thread_id,
                                             type=msg.chat_type, title=msg.chat_title)

    async def _converse(self, msg: Incoming, text: str, on_logged=None) -> list[Outgoing]:
        chat_id = await self._chat_id(msg)
        user_id = await self.conversations.user(msg.platform, msg.user_id, name=msg.user_name)
        await self.conversations.log_message(chat_id, "user", text, user_id=user_id,
                                             platform_message_id=msg.message_id, reply_to=msg.reply_to_message_id)
        if on_logged is not None:
            on_logged()
        if not self.limiter.allow((msg.platform, msg.user_id)):
            wait = self.limiter.retry_in((msg.platform, msg.user_id))
            return [Outgoing(f"You're sending messages faster than I can think. Please wait {wait:.0f} s.",
                             reply_to=msg.message_id)]
        gen = self.config.generation
        turns = await self.conversations.context(chat_id, gen.max_history_turns)
        limit = self.config.chat.max_message_chars
        history = [(t.role, t.text[-limit:]) for t in turns]
        try:
            reply = await self.engine.reply(history)
        except (EngineBusy, EngineStopped):
            return [Outgoing(BUSY_TEXT, reply_to=msg.message_id)]
        except Exception:
            log.exception("generation failed for %s chat %s", msg.platform, msg.chat_id)
            return [Outgoing(ERROR_TEXT, reply_to=msg.message_id)]
        stored = await self.conversations.log_message(chat_id, "bot", reply.text, model_version=reply.model_version,
                                                      reply_to=msg.message_id, status="pending")
        return [Outgoing(reply.text, stored_id=stored, reply_to=msg.message_id)]

    # ---- commands ---------------------------------------------------------------
    async def _command(self, name: str, args: list[str], msg: Incoming) -> list[Outgoing]:
        if name in ADMIN_COMMANDS:
            return await self.admin.handle(name, args, msg)
        if name in ("start", "help"):
            return [Outgoing(help_text(self.admin.is_admin(msg.platform, msg.user_id)))]
        if name == "reset":
            await self.conversations.reset(await self._chat_id(msg))
            return [Outgoing("Fresh start! I've put our earlier conversation out of mind.")]
        if name == "forget":
            deleted = await self.conversations.forget_user(msg.platform, msg.user_id)
            return [Outgoing(f"Done: I deleted {deleted} of your messages, and they will never be used for training.",
                             ephemeral=True)]
        if name in ("optout", "optin"):
            await self.conversations.set_consent(await self._chat_id(msg), name == "optin")
            if name == "optout":
                return [Outgoing("This chat will no longer be used to train me. /optin to change your mind.")]
            return [Outgoing("Thanks! This chat may help me learn again.")]
        if msg.is_private or msg.mentions_bot:
            return [Outgoing(f"I don't know the command /{name}. Try /help.")]
        return []
