"""Who administers a Telegram chat, asked of getChatMember and remembered for a minute.

Two commands need it: those that change a group's settings (the sender must administer
the group), and `/forget <channel>`, with which a channel's admins delete what was posted
under the channel's name ("send as channel" posts and a linked channel's automatic
forwards are stored under the channel's id, which no person owns). The answers are kept
in a bounded TTL cache, so memory stays flat however many chats the bot is in.
"""
from __future__ import annotations

import logging

from cachetools import TTLCache
from telegram.error import TelegramError

from bots.chat.commands import parse_command
from bots.chat.events import GROUP_ADMIN_COMMANDS, Incoming
from bots.platforms.redaction import redact

log = logging.getLogger(__name__)

ADMIN_STATUSES = ("creator", "administrator")


class ChatAdmins:
    def __init__(self, bot, *, size: int, ttl_s: float):
        self.bot = bot                  # () -> the PTB bot (the application may be rebuilt)
        self.cache: TTLCache[tuple[int, int], bool] = TTLCache(size, ttl_s)

    def __len__(self) -> int:
        return len(self.cache)

    async def is_admin(self, chat_id: int, user_id: int) -> bool:
        """Whether the user is the chat's creator or an administrator; a failed lookup is no."""
        key = (chat_id, user_id)
        cached = self.cache.get(key)
        if cached is None:
            try:
                member = await self.bot().get_chat_member(chat_id, user_id)
                cached = member.status in ADMIN_STATUSES
            except TelegramError as exc:
                log.warning("getChatMember failed for a command: %s", redact(exc))
                cached = False
            self.cache[key] = cached
        return cached

    async def mark(self, msg: Incoming) -> None:
        """Fill `sender_is_chat_admin` for the commands that need it."""
        parsed = parse_command((msg.text or "").strip())
        if parsed is None or msg.anonymous:
            return
        name, args, _ = parsed
        if name == "forget" and args:
            await self._forget_target(msg, args[0])
        elif name in GROUP_ADMIN_COMMANDS and not msg.is_private:
            msg.sender_is_chat_admin = await self.is_admin(int(msg.chat_id), int(msg.user_id))

    async def _forget_target(self, msg: Incoming, target: str) -> None:
        """`/forget <channel>` (an id or @username): the command is rewritten to the chat's
        id, and `sender_is_chat_admin` says whether the sender administers *that* chat."""
        try:
            chat = await self.bot().get_chat(target if target.startswith("@") else int(target))
        except (TelegramError, ValueError) as exc:
            log.info("/forget: no chat %r: %s", target[:64], redact(exc))
            msg.sender_is_chat_admin = False
            return
        msg.text = f"/forget {chat.id}"
        msg.sender_is_chat_admin = await self.is_admin(chat.id, int(msg.user_id))
