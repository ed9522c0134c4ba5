"""The chat logic every platform shares, as named steps (one message, one pass):

    parse -> gate -> log the user message -> build context -> generate -> log the reply

The user's message is stored before generation starts, so a crash never loses it; the
reply is stored as "pending" and the adapter marks it sent or failed. Commands leave the
path after `parse`; messages the bot should not answer leave it at `gate`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from bots.chat.admin import AdminCommands
from bots.chat.commands import BY_NAME, help_text, parse_command
from bots.chat.events import Incoming, Outgoing
from bots.chat.ratelimit import RateLimiter
from bots.chat.routing import current_chat
from bots.metrics import record_reply
from engine.serving.batcher import EngineBusy, EngineStopped

log = logging.getLogger(__name__)

BUSY_TEXT = "I'm a bit busy right now. Please try again in a moment."
ERROR_TEXT = "Sorry, something went wrong on my side. Please try again."
NON_TEXT_TEXT = "I can only read text messages for now."


@dataclass
class Parsed:
    """What `parse` made of a message: a command, text to converse about, or a final answer."""

    text: str = ""
    command: tuple[str, list[str]] | None = None
    answer: list[Outgoing] | None = None      # set when the message needs no further step


@dataclass
class Gate:
    """`gate`'s verdict: answer at all, and if so whether the sender must slow down first."""

    answer: bool
    slow_down: Outgoing | None = None


class ChatService:
    def __init__(self, config, engine, conversations, learning=None):
        self.config = config
        self.engine = engine
        self.conversations = conversations
        self.admin = AdminCommands(config.admins, conversations, engine, learning)
        self.limiter = RateLimiter(config.chat.rate_limit_messages, config.chat.rate_limit_seconds)
        self.user_commands = {"start": self._help, "help": self._help, "reset": self._reset,
                              "forget": self._forget, "optout": self._consent, "optin": self._consent}

    # ---- entry point --------------------------------------------------------------
    async def handle(self, msg: Incoming, *, on_logged=None) -> list[Outgoing]:
        """Everything the bot says back to one incoming message (often nothing).

        `on_logged()`, when given, is called as soon as the user's message is stored, before
        generation starts: an adapter may acknowledge the platform's delivery from then on."""
        parsed = self.parse(msg)
        if parsed.answer is not None:
            return parsed.answer
        if parsed.command is not None:
            return await self.command(*parsed.command, msg)
        verdict = self.gate(msg)
        if not verdict.answer:
            return []
        chat_id = await self.log_user_message(msg, parsed.text)
        current_chat.set(chat_id)  # a per-chat router (the canary) picks the engine by it
        if on_logged is not None:
            on_logged()
        if verdict.slow_down is not None:
            return [verdict.slow_down]
        history = await self.build_context(chat_id)
        reply = await self.generate(msg, history)
        if isinstance(reply, Outgoing):  # busy or failed: said, not stored
            return [reply]
        return [await self.log_reply(chat_id, msg, reply)]

    # ---- the steps ----------------------------------------------------------------
    def parse(self, msg: Incoming) -> Parsed:
        """Non-text messages get a note in private chats; blank text nothing; "/x" is a command."""
        if msg.kind != "text" or msg.text is None:
            return Parsed(answer=[Outgoing(NON_TEXT_TEXT, reply_to=msg.message_id)] if msg.is_private else [])
        text = msg.text.strip()
        if not text:
            return Parsed(answer=[])
        command = parse_command(text)
        if command is not None:
            return Parsed(text, command=(command[0], command[1]))
        return Parsed(text)

    def gate(self, msg: Incoming) -> Gate:
        """Answer at all (see `should_answer`), and the per-user rate limit."""
        if not self.should_answer(msg):
            return Gate(False)
        key = (msg.platform, msg.user_id)
        if self.limiter.allow(key):
            return Gate(True)
        wait = self.limiter.retry_in(key)
        return Gate(True, Outgoing(f"You're sending messages faster than I can think. Please wait {wait:.0f} s.",
                                   reply_to=msg.message_id))

    def should_answer(self, msg: Incoming) -> bool:
        if msg.is_private or msg.answer_all or self.config.chat.answer_all_in_groups:
            return True
        return msg.mentions_bot or msg.reply_to_bot

    def will_generate(self, msg: Incoming) -> bool:
        """Whether `handle` is going to ask the engine (so a typing indicator is honest)."""
        parsed = self.parse(msg)
        return parsed.answer is None and parsed.command is None and self.should_answer(msg)

    async def log_user_message(self, msg: Incoming, text: str) -> int:
        """Store the user's message (also when rate-limited: the log is the whole conversation)."""
        chat_id = await self._chat_id(msg)
        user_id = await self.conversations.user(msg.platform, msg.user_id, name=msg.user_name)
        await self.conversations.log_message(chat_id, "user", text, user_id=user_id,
                                             platform_message_id=msg.message_id, reply_to=msg.reply_to_message_id)
        return chat_id

    async def build_context(self, chat_id: int) -> list[tuple[str, str]]:
        """The chat's turns since its last /reset, each cut to the platform-neutral length limit."""
        turns = await self.conversations.context(chat_id, self.config.generation.max_history_turns)
        limit = self.config.chat.max_message_chars
        return [(t.role, t.text[-limit:]) for t in turns]

    async def generate(self, msg: Incoming, history: list[tuple[str, str]]):
        """The engine's reply, or an Outgoing that says why there is none."""
        try:
            return await self.engine.reply(history)
        except (EngineBusy, EngineStopped):
            return Outgoing(BUSY_TEXT, reply_to=msg.message_id)
        except Exception:
            log.exception("generation failed for %s chat %s", msg.platform, msg.chat_id)
            return Outgoing(ERROR_TEXT, reply_to=msg.message_id)

    async def log_reply(self, chat_id: int, msg: Incoming, reply) -> Outgoing:
        """Store the reply as pending (with the model version that wrote it) and hand it out."""
        stored = await self.conversations.log_message(chat_id, "bot", reply.text, model_version=reply.model_version,
                                                      reply_to=msg.message_id, status="pending")
        record_reply(msg.platform, "fallback" if reply.fallback else "ok", reply.latency_s, reply.new_tokens)
        return Outgoing(reply.text, stored_id=stored, reply_to=msg.message_id)

    # ---- delivery reports from the adapters ---------------------------------------------
    async def delivered(self, out: Outgoing, platform_message_id: str | None) -> None:
        if out.stored_id is not None:
            await self.conversations.set_status(out.stored_id, "ok", platform_message_id=platform_message_id)

    async def failed(self, out: Outgoing) -> None:
        if out.stored_id is not None:
            await self.conversations.set_status(out.stored_id, "failed")

    # ---- commands ---------------------------------------------------------------
    async def command(self, name: str, args: list[str], msg: Incoming) -> list[Outgoing]:
        spec = BY_NAME.get(name)
        if spec is not None and spec.admin:
            return await self.admin.handle(name, args, msg)
        handler = self.user_commands.get(name)
        if handler is not None:
            return await handler(name, msg)
        if msg.is_private or msg.mentions_bot:
            return [Outgoing(f"I don't know the command /{name}. Try /help.")]
        return []

    async def _chat_id(self, msg: Incoming) -> int:
        return await self.conversations.chat(msg.platform, msg.chat_id, thread_id=msg.thread_id,
                                             type=msg.chat_type, title=msg.chat_title)

    async def _help(self, name: str, msg: Incoming) -> list[Outgoing]:
        return [Outgoing(help_text(self.admin.is_admin(msg.platform, msg.user_id)))]

    async def _reset(self, name: str, msg: Incoming) -> list[Outgoing]:
        await self.conversations.reset(await self._chat_id(msg))
        return [Outgoing("Fresh start! I've put our earlier conversation out of mind.")]

    async def _forget(self, name: str, msg: Incoming) -> list[Outgoing]:
        deleted = await self.conversations.forget_user(msg.platform, msg.user_id)
        return [Outgoing(f"Done: I deleted {deleted} of your messages, and they will never be used for training.",
                         ephemeral=True)]

    async def _consent(self, name: str, msg: Incoming) -> list[Outgoing]:
        await self.conversations.set_consent(await self._chat_id(msg), name == "optin")
        if name == "optout":
            return [Outgoing("This chat will no longer be used to train me. /optin to change your mind.")]
        return [Outgoing("Thanks! This chat may help me learn again.")]
