"""What the user commands do (/help, /reset, /forget, /optout, /optin, /persona): the
"user.*" handlers of the command table (bots/chat/commands.py).

A group's settings (/reset, /optout, /optin, /persona) are for its admins and Mynah's;
every such attempt is audited.
"""
from __future__ import annotations

import logging

from bots.chat.commands import help_text
from bots.chat.events import Incoming, Outgoing

log = logging.getLogger(__name__)

PERSONA_MAX_CHARS = 2000
ANONYMOUS_FORGET_TEXT = ("/forget needs to know who you are, but this message was sent on behalf of a chat "
                         "(anonymously). Send /forget as yourself, e.g. in a private chat with me. To forget what "
                         "was posted under a channel's name, one of its admins sends /forget <the channel's id or "
                         "@username> as themselves.")


async def chat_row(chats, msg: Incoming) -> int:
    """The stored chat (chats.id) a message belongs to, created on first sight."""
    return await chats.chat(msg.platform, msg.chat_id, thread_id=msg.thread_id, type=msg.chat_type,
                                    title=msg.chat_title)


class UserCommands:
    def __init__(self, config, store, is_admin, learning=None, *, forgets_for_chats=frozenset()):
        self.config = config
        self.forgets_for_chats = forgets_for_chats   # platforms whose adapters check /forget <chat>
        self.store = store      # storage.store.Store
        self.is_admin = is_admin          # (platform, user_id) -> bool: Mynah's admins
        self.learning = learning          # /forget retires the model versions that learned from the sender

    async def _chat_id(self, msg: Incoming) -> int:
        return await chat_row(self.store.chats, msg)

    async def command_help(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return [Outgoing(help_text(self.is_admin(msg.platform, msg.user_id)))]

    async def _group_admin(self, name: str, msg: Incoming) -> bool:
        """A group's settings are for its admins and Mynah's; every attempt is audited."""
        allowed = self.is_admin(msg.platform, msg.user_id) or msg.sender_is_chat_admin is True
        await self.store.audit.record(msg.platform, msg.user_id, name, f"group {msg.chat_id}", allowed)
        return allowed

    async def command_reset(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        if not msg.is_private and not await self._group_admin("reset", msg):
            return [Outgoing("Sorry, only this group's admins can /reset the group's conversation.", ephemeral=True)]
        await self.store.messages.reset(await self._chat_id(msg))
        return [Outgoing("Fresh start! I've put our earlier conversation out of mind.")]

    async def command_forget(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        """/forget: everything the sender said. /forget <chat>: what was posted under a
        channel's (or group's) name, for that chat's admins (the adapter checks who they are)."""
        if msg.anonymous:   # the id is the group's: it would delete every anonymous admin's messages
            return [Outgoing(ANONYMOUS_FORGET_TEXT, ephemeral=True)]
        if args:
            return await self._forget_for_chat(args[0], msg)
        deleted = await self._forget(msg.platform, msg.user_id)
        return [Outgoing(f"Done: I deleted {deleted[0]} of your messages; they will never be used for training."
                         f"{deleted[1]}", ephemeral=True, private=True)]

    async def _forget_for_chat(self, target: str, msg: Incoming) -> list[Outgoing]:
        if msg.platform not in self.forgets_for_chats:
            return [Outgoing("/forget takes no argument here: it deletes everything you said to me.", ephemeral=True)]
        allowed = msg.sender_is_chat_admin is True
        await self.store.audit.record(msg.platform, msg.user_id, "forget", f"posted as {target}"[:200], allowed)
        if not allowed:
            return [Outgoing(f"Only the admins of {target[:64]} can make me forget what was posted under its name "
                             "(and I could not confirm that you are one). /forget alone deletes your own messages.",
                             ephemeral=True, private=True)]
        deleted, model = await self._forget(msg.platform, target)
        return [Outgoing(f"Done: as an admin of {target}, you had me delete {deleted} messages posted under its name; "
                         f"they will never be used for training.{model}", ephemeral=True, private=True)]

    async def _forget(self, platform: str, user_id: str) -> tuple[int, str]:
        """Delete what `user_id` posted; (how many, what became of the model versions)."""
        deleted = await self.store.messages.forget_user(platform, user_id)
        if self.learning is None:
            return deleted, ""
        try:
            return deleted, " " + await self.learning.trust.forgot(platform, user_id)
        except Exception:
            log.exception("/forget: updating the model versions failed")
            return deleted, (" I could not yet retire the model versions that learned from them; the admins can see "
                             "this in the log, and the next run will not use those messages.")

    async def command_persona(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        """/persona shows the chat's persona, /persona <text> sets it, /persona reset clears it.

        Anyone may set it in a private chat; in groups, the group's admins and Mynah's (audited)."""
        chat_id = await self._chat_id(msg)
        parts = (msg.text or "").split(maxsplit=1)
        text = parts[1].strip() if len(parts) > 1 else ""
        if not text:
            own = await self.store.chats.persona(chat_id)
            current = own if own is not None else self.config.chat.default_persona
            if not current:
                return [Outgoing("This chat has no persona. Set one with /persona <text>.")]
            where = "this chat's own" if own is not None else "the default"
            return [Outgoing(f"Persona ({where}): {current}")]
        if not msg.is_private and not await self._group_admin("persona", msg):
            return [Outgoing("Only this chat's admins can change my persona here.", ephemeral=True)]
        if text.lower() == "reset":
            await self.store.chats.set_persona(chat_id, None)
            return [Outgoing("Persona cleared: back to the default.")]
        if len(text) > PERSONA_MAX_CHARS:
            return [Outgoing(f"That persona is {len(text)} characters long; please keep it under "
                             f"{PERSONA_MAX_CHARS}. Nothing was changed.")]
        await self.store.chats.set_persona(chat_id, text)
        return [Outgoing("Persona set. It applies from my next reply (models without a system prompt, like "
                         "DialoGPT, ignore it).")]

    async def command_optout(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return await self._consent("optout", msg)

    async def command_optin(self, args: list[str], msg: Incoming) -> list[Outgoing]:
        return await self._consent("optin", msg)

    async def _consent(self, name: str, msg: Incoming) -> list[Outgoing]:
        """The sender's own consent always follows their word; a group's only its admins'."""
        optin = name == "optin"
        await self.store.trust.set_user_consent(msg.platform, msg.user_id, optin)
        if not msg.is_private and not await self._group_admin(name, msg):
            own = ("Your own messages may help me learn again" if optin else
                   "Your own messages will no longer be used to train me, in any chat")
            return [Outgoing(f"{own}. Keeping this whole group in or out of training is for its admins.",
                             ephemeral=True)]
        if msg.is_private:
            await self.store.audit.record(msg.platform, msg.user_id, name, "private chat", True)
        await self.store.chats.set_consent(await self._chat_id(msg), optin)
        if not optin:
            return [Outgoing("This chat will no longer be used to train me. What earlier versions already learned "
                             "stays (/forget deletes your messages and unlearns them). /optin to change your mind.")]
        return [Outgoing("Thanks! This chat may help me learn again.")]
