"""The chat logic every platform shares, as named steps (one message, one pass):

    parse -> gate -> log the user message -> build context (+ persona) -> generate -> log the reply

The user's message is stored before generation starts, so a crash never loses it; the
reply is stored as "pending" (linked to the message it answers) and the delivery routine
(bots/chat/delivery.py) marks it sent or failed. Writes on this path are retried while
storage is locked or full (bots/chat/durable.py). With `[chat] stream` and a
`StreamedMessage`, `generate` feeds it the text as the engine writes it; the pending row is
stored while the engine starts (empty, so a crash leaves it for start-up recovery to write
again; nothing is shown before it is stored) and completed once the reply is. Commands leave the path after `parse`; messages the
bot should not answer leave it at `gate`; messages over the rate limit are stored as
'limited' and never answered (one "slow down" notice per window); commands and non-text
messages count toward the same limit. The console's operator is not limited.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from bots.chat.admin import AdminCommands
from bots.chat.commands import BY_NAME, bind, parse_command
from bots.chat.events import Incoming, Outgoing
from bots.chat.memory import MEMORY_VERSION, UserMemory
from bots.chat.durable import WriteRetry
from bots.chat.ratelimit import RateLimiter, Verdict
from bots.chat.streaming import ShownAfter
from bots.chat.user_commands import UserCommands, chat_row
from bots.metrics import record_reply
from bots.platforms.registry import admin_ids, forgetting_for_chats, unlimited_platforms
from engine.serving.protocol import EngineBusy, EngineStopped, EngineUnavailable, Reply
from storage.messages import MessageGone

log = logging.getLogger(__name__)

BUSY_TEXT = "I'm a bit busy right now. Please try again in a moment."
ERROR_TEXT = "Sorry, something went wrong on my side. Please try again."
NON_TEXT_TEXT = "I can only read text messages for now."
UNAVAILABLE_TEXT = ("Sorry, I can't think right now: the engine that writes my replies is unreachable. "
                    "I've kept your message; please try again in a little while.")
UNKNOWN_NAME_CHARS = 32     # of an unknown command's name echoed back


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
    limited: bool = False        # over the rate limit: store as 'limited', do not answer


class ChatService:
    def __init__(self, config, engine, store, learning=None, *, admins=None):
        """`admins`: {platform: admin ids, None for everyone there}; default: from each
        registered platform's spec and the config's [admins]."""
        self.config = config
        self.engine = engine
        self.store = store      # storage.store.Store
        self.limiter = RateLimiter(config.chat.rate_limit_messages, config.chat.rate_limit_seconds)
        self.shared_limits = None   # bots.chat.shared_limit.SharedRateLimiter with several workers
        self.unlimited = unlimited_platforms()      # platforms whose users are never rate-limited
        self.writes = WriteRetry(config.storage.write_retry_first_s, config.storage.write_retry_max_s)
        self.admin = AdminCommands(admin_ids(config) if admins is None else admins, store, engine, learning,
                                   writes=self.writes)
        self.user = UserCommands(config, store, self.admin.is_admin, learning,
                                 forgets_for_chats=forgetting_for_chats())
        self.memory = UserMemory(store)   # what each user told Mynah about themselves
        # Each command's handler, bound once from the command table (bots/chat/commands.py).
        self.handlers = bind({"user": self.user, "admin": self.admin, "memory": self.memory,
                              "learning": learning.commands if learning is not None else None,
                              "trust": learning.trust if learning is not None else None})

    # ---- entry point --------------------------------------------------------------
    async def handle(self, msg: Incoming, *, on_logged=None, stream=None) -> list[Outgoing]:
        """Everything the bot says back to one incoming message (often nothing).

        `on_logged()`, when given, is called as soon as the user's message is stored, before
        generation starts: an adapter may acknowledge the platform's delivery from then on.
        Commands and non-text messages are not stored: it is called for them at once, so
        their answers (which a platform may throttle) never hold other chats' updates.
        `stream` (a bots.chat.streaming.StreamedMessage) is shown the reply as it is written
        when `[chat] stream` is on; the adapter then finishes it with the returned Outgoing."""
        parsed = self.parse(msg)
        if on_logged is not None and (parsed.answer is not None or parsed.command is not None):
            on_logged()     # stores nothing: acknowledged at once, never waiting for its (throttled) answer
        if parsed.answer is not None:    # a sticker's note counts toward the limit like any message
            verdict = await self.limit(msg) if parsed.answer else Verdict(True)
            return parsed.answer if verdict.allowed else self._slow_down_once(msg, verdict)
        if parsed.command is not None:
            return await self.command(*parsed.command, msg)
        verdict = await self.gate(msg)
        if not verdict.answer:
            return []
        chat_id, stored, handled = await self.log_user_message(msg, parsed.text,
                                                               "limited" if verdict.limited else "ok")
        if on_logged is not None:
            on_logged()
        if handled:              # delivered twice (a redelivery after a restart): answered already
            return []
        if verdict.limited:
            return [verdict.slow_down] if verdict.slow_down is not None else []
        system = await self.memory.prompt_after(msg, parsed.text, await self.persona(chat_id))
        known = await self.memory.answer(msg, parsed.text)   # "what's my name?": from memory, not the model
        if known is not None:
            out = await self.log_reply(chat_id, stored, msg, Reply(known, MEMORY_VERSION, 0, 0.0))
            return [out] if out is not None else []
        history = await self.build_context(chat_id)
        stream = stream if self.config.chat.stream else None
        held = holding = None
        if stream is not None:   # shown before it is complete: a crash now must not lose it
            holding = asyncio.ensure_future(self.hold_reply(chat_id, stored, msg))  # stored while the engine starts
            stream = ShownAfter(stream, holding)
        reply = await self.generate(msg, history, system=system, route=chat_id, stream=stream)
        if holding is not None:
            held = await holding
            if held is None:     # forgotten meanwhile: nothing was shown, nothing is sent
                return []
        if isinstance(reply, Outgoing):  # busy or failed: said, not stored
            if held is not None:
                await self.failed(Outgoing("", stored_id=held))
            return [reply]
        out = await self.log_reply(chat_id, stored, msg, reply, held=held)
        return [out] if out is not None else []

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

    async def gate(self, msg: Incoming) -> Gate:
        """Answer at all (see `should_answer`), and the per-user rate limit."""
        if not self.should_answer(msg):
            return Gate(False)
        verdict = await self.limit(msg)
        if verdict.allowed:
            return Gate(True)
        return Gate(True, self._slow_down(msg, verdict), limited=True)

    async def limit(self, msg: Incoming) -> Verdict:
        """The sender's rate limit: every kind of message and every command counts. A platform
        whose spec says so (the console: its operator owns the machine) is not limited. With
        several workers (`shared_limits`), counted across all of them."""
        if msg.platform in self.unlimited:
            return Verdict(True)
        key = (msg.platform, msg.user_id)
        if self.shared_limits is not None:
            return await self.shared_limits.check(key)
        return self.limiter.check(key)

    @staticmethod
    def _slow_down(msg: Incoming, verdict: Verdict) -> Outgoing | None:
        """The one notice per window an over-limit user gets (None: already told)."""
        if not verdict.notify:
            return None
        return Outgoing(f"You're sending messages faster than I can think. Please wait {verdict.retry_in:.0f} s; "
                        "I won't answer until then.", reply_to=msg.message_id)

    @classmethod
    def _slow_down_once(cls, msg: Incoming, verdict: Verdict) -> list[Outgoing]:
        notice = cls._slow_down(msg, verdict)
        return [notice] if notice is not None else []

    def should_answer(self, msg: Incoming) -> bool:
        if msg.is_private or msg.answer_all or self.config.chat.answer_all_in_groups:
            return True
        return msg.mentions_bot or msg.reply_to_bot

    def will_generate(self, msg: Incoming) -> bool:
        """Whether `handle` is going to ask the engine (so a typing indicator is honest; a
        flood over the rate limit gets no typing indicator either)."""
        parsed = self.parse(msg)
        return (parsed.answer is None and parsed.command is None and self.should_answer(msg)
                and (msg.platform in self.unlimited or self.limiter.peek((msg.platform, msg.user_id))))

    async def log_user_message(self, msg: Incoming, text: str, status: str = "ok") -> tuple[int, int, bool]:
        """Store the user's message, retrying while storage is unavailable; (chats.id,
        messages.id, already handled). A message stored before (redelivered) is not stored again.

        Also when rate-limited (status 'limited'): the log is the whole conversation, but a
        limited message is never answered, trained on or counted toward retraining."""
        async def write():
            chat_id = await chat_row(self.store.chats, msg)
            seen = None if msg.message_id is None else await self.store.messages.seen_message(chat_id, msg.message_id)
            if seen is not None:
                return chat_id, seen[0], seen[1]
            user_id = await self.store.chats.user(msg.platform, msg.user_id, name=msg.user_name)
            stored = await self.store.messages.log_once(
                chat_id, "user", text, user_id=user_id, platform_message_id=msg.message_id,
                reply_to=msg.reply_to_message_id, status=status)
            if stored is None:   # another worker stored it this very moment: that one answers it
                seen = await self.store.messages.seen_message(chat_id, msg.message_id)
                log.warning("%s message %s in chat %s: another worker is handling it too; leaving it to that one",
                            msg.platform, msg.message_id, msg.chat_id)
                return chat_id, None if seen is None else seen[0], True
            return chat_id, stored, False

        return await self.writes.run(f"{msg.platform} message {msg.message_id} in chat {msg.chat_id}", write)

    async def build_context(self, chat_id: int) -> list[tuple[str, str]]:
        """The chat's turns since its last /reset, each cut to the platform-neutral length limit."""
        turns = await self.store.messages.context(chat_id, self.config.generation.max_history_turns)
        limit = self.config.chat.max_message_chars
        return [(t.role, t.text[-limit:]) for t in turns]

    async def persona(self, chat_id: int) -> str:
        """The chat's system prompt: its own /persona, else `[chat] default_persona`."""
        own = await self.store.chats.persona(chat_id)
        return own if own is not None else self.config.chat.default_persona

    async def generate(self, msg: Incoming, history: list[tuple[str, str]], *, system: str = "", route=None,
                       stream=None):
        """The engine's reply, or an Outgoing that says why there is none. With `stream`, the
        text is shown as it is written (the engine's ReplyStream feeds stream.show). `route`
        (the chats.id) lets a per-chat engine (the canary's Router) pick the model."""
        try:
            if stream is None:
                return await self.engine.reply(history, system=system, route=route)
            written = self.engine.stream(history, system=system, route=route)
            async for _ in written:
                await stream.show(written.text)
            return written.reply
        except (EngineBusy, EngineStopped):
            return Outgoing(BUSY_TEXT, reply_to=msg.message_id)
        except EngineUnavailable as exc:
            log.warning("no reply for %s chat %s: %s", msg.platform, msg.chat_id, exc)
            return Outgoing(UNAVAILABLE_TEXT, reply_to=msg.message_id)
        except Exception:
            log.exception("generation failed for %s chat %s", msg.platform, msg.chat_id)
            return Outgoing(ERROR_TEXT, reply_to=msg.message_id)

    async def hold_reply(self, chat_id: int, answered: int, msg: Incoming, text: str = "",
                         model_version: str | None = None) -> int | None:
        """Store a pending reply row (empty while a streamed reply is still being written, so
        that after a crash start-up recovery writes and sends it). None, and the reply is
        dropped, when the message it answers was forgotten (/forget) meanwhile or already has
        a reply sent or on its way (another worker handled the same delivery)."""
        try:
            held = await self.writes.run(
                f"{msg.platform} reply in chat {msg.chat_id}",
                lambda: self.store.messages.log_once(chat_id, "bot", text, model_version=model_version,
                                                    reply_to=msg.message_id, status="pending", reply_to_id=answered))
        except MessageGone:
            log.info("%s chat %s: the message was forgotten while its reply was written; the reply is dropped",
                     msg.platform, msg.chat_id)
            return None
        if held is None:
            log.warning("%s message %s in chat %s: another worker answered it; this reply is dropped",
                        msg.platform, msg.message_id, msg.chat_id)
        return held

    async def log_reply(self, chat_id: int, answered: int, msg: Incoming, reply, *, held: int | None = None
                        ) -> Outgoing | None:
        """Store the reply as pending (with the model version that wrote it, linked to the
        stored message `answered`; into the `held` row when streaming stored one) and hand it
        out. None when the message was forgotten meanwhile: neither stored nor sent."""
        if held is None:
            stored = await self.hold_reply(chat_id, answered, msg, reply.text, reply.model_version)
            if stored is None:
                return None
        else:
            stored = held
            if not await self.writes.run(f"{msg.platform} reply in chat {msg.chat_id}", lambda: self.store.messages.
                                         set_status(held, "pending", text=reply.text, model_version=reply.model_version)):
                log.warning("%s message %s in chat %s: another worker took it over and answers it; this reply is "
                            "dropped", msg.platform, msg.message_id, msg.chat_id)
                return None
        record_reply(msg.platform, "fallback" if reply.fallback else "ok", reply.latency_s, reply.new_tokens)
        return Outgoing(reply.text, stored_id=stored, reply_to=msg.message_id)

    # ---- delivery reports from the adapters ---------------------------------------------
    async def delivered(self, out: Outgoing, platform_message_id: str | None) -> None:
        if out.stored_id is not None:
            if not await self.writes.run(f"delivery of reply {out.stored_id}", lambda: self.store.messages.set_status(
                    out.stored_id, "ok", platform_message_id=platform_message_id)):
                log.warning("reply %s was sent, but another worker had taken its message over and answers it too: "
                            "the chat may see two answers (this one is recorded as failed)", out.stored_id)

    async def failed(self, out: Outgoing, platform_message_id: str | None = None) -> None:
        """Not (wholly) delivered; a partly sent reply keeps its first part's id, so a reply
        to that part still counts as a reply to the bot."""
        if out.stored_id is not None:
            await self.writes.run(f"failure of reply {out.stored_id}", lambda: self.store.messages.set_status(
                out.stored_id, "failed", platform_message_id=platform_message_id))

    async def recover_pending(self, platform: str, send) -> tuple[int, int]:
        """Replies left 'pending' by a process that died mid-send: resent through
        `send(chat_id, thread_id, out)` when younger than [chat] resend_pending_minutes,
        else marked failed. One cut short while it was streamed (stored empty) is written
        again now, from the chat's context. Returns (resent, failed); `send` marks each
        delivered or failed, so each is dealt with once."""
        max_age = self.config.chat.resend_pending_minutes * 60
        resent = dropped = 0
        for pending in await self.store.messages.pending_replies(platform):
            text = pending.text
            if time.time() - pending.created_at <= max_age and not text:
                text = await self._rewrite(pending)
            if time.time() - pending.created_at <= max_age and text:
                out = Outgoing(text, stored_id=pending.id, reply_to=pending.reply_to_platform_id)
                await send(pending.platform_chat_id, pending.thread_id, out)
                resent += 1
            else:
                await self.store.messages.set_status(pending.id, "failed")
                dropped += 1
        if resent or dropped:
            log.warning("%s: %d reply(ies) left pending by the last run: %d resent, %d too old and marked failed",
                        platform, resent + dropped, resent, dropped)
        return resent, dropped

    async def _rewrite(self, pending) -> str:
        """The reply a crash cut short while it was streamed, written again (and stored)."""
        chat_id = await self.store.chats.chat(pending.platform, pending.platform_chat_id, thread_id=pending.thread_id)
        try:
            reply = await self.engine.reply(await self.build_context(chat_id), system=await self.persona(chat_id),
                                            route=chat_id)
        except Exception as exc:       # the engine is down: the reply is marked failed
            log.warning("could not write again a reply cut short by the last run: %s", exc)
            return ""
        await self.store.messages.set_status(pending.id, "pending", text=reply.text, model_version=reply.model_version)
        return reply.text

    # ---- commands ---------------------------------------------------------------
    async def command(self, name: str, args: list[str], msg: Incoming) -> list[Outgoing]:
        """Run a command; commands count toward the sender's rate limit like messages do."""
        spec = BY_NAME.get(name)
        if spec is None and not (msg.is_private or msg.mentions_bot):
            return []             # someone else's command in a group: not ours, costs nothing
        verdict = await self.limit(msg)
        if not verdict.allowed:
            return self._slow_down_once(msg, verdict)
        handler = self.handlers.get(name)
        if spec is not None and spec.admin:
            return await self.admin.handle(name, args, msg, handler)
        if handler is not None:
            return await self.writes.run(f"command /{name}", lambda: handler(args, msg))
        shown = name[:UNKNOWN_NAME_CHARS] + ("…" if len(name) > UNKNOWN_NAME_CHARS else "")
        return [Outgoing(f"I don't know the command /{shown}. Try /help.")]
