"""Telegram message -> platform-neutral `Incoming` (or None for what Mynah never answers).

Private chats answer everything; in groups what counts is a @mention (or a text_mention of
the bot, or `/cmd@thisbot`), a reply to the bot, or the chat type being listed in
`[telegram] answer_all_chat_types`. A forum topic is its own conversation.
"""
from __future__ import annotations

import re
from collections.abc import Collection

from telegram import Bot, Message, MessageEntity
from telegram.constants import ChatType

from bots.chat.commands import parse_command
from bots.chat.events import Incoming
from bots.platforms.telegram.spec import SPEC

PLATFORM = SPEC.name


def to_incoming(message: Message, bot: Bot, answer_all_chat_types: Collection[str]) -> Incoming | None:
    """The neutral event for a Telegram message; None for channel posts, service messages
    and other bots. `bot` is our own user (getMe)."""
    chat = message.chat
    if chat.type == ChatType.CHANNEL:
        return None
    sender = message.from_user
    on_behalf = message.sender_chat   # anonymous group admins, linked channels: a bot "sends" for a chat
    if sender is not None and sender.is_bot and on_behalf is None:
        return None                   # other bots (and never ourselves)
    kind = "text" if message.text is not None else message_kind(message)
    if kind is None:
        return None                   # service message: member joined, pinned, topic created…
    topic = bool(message.is_topic_message and message.message_thread_id)
    reply = message.reply_to_message
    if reply is not None and topic and reply.message_id == message.message_thread_id:
        reply = None  # in a forum topic every message "replies" to the topic's first message
    text, mentions = message.text, False
    if text is not None:
        text, mentions = read_mentions(message, bot)
    private = chat.type == ChatType.PRIVATE
    if on_behalf is not None:
        user_id, user_name = on_behalf.id, on_behalf.effective_name
    else:
        user_id, user_name = (sender.id, sender.full_name) if sender is not None else (chat.id, None)
    return Incoming(
        platform=PLATFORM, chat_id=str(chat.id), user_id=str(user_id), text=text,
        chat_type="private" if private else "group",
        user_name=user_name,
        thread_id=str(message.message_thread_id) if topic else "",
        chat_title=None if private else chat.title,
        message_id=str(message.message_id),
        reply_to_message_id=str(reply.message_id) if reply is not None else None,
        mentions_bot=mentions,
        reply_to_bot=bool(reply is not None and reply.from_user is not None and reply.from_user.id == bot.id),
        answer_all=(not private) and chat.type in answer_all_chat_types,
        kind=kind,
        anonymous=on_behalf is not None,
        can_answer_privately=SPEC.can_answer_privately,
    )


def read_mentions(message: Message, bot: Bot) -> tuple[str, bool]:
    """(text without @botname, whether the bot is mentioned or the command is ours)."""
    username = (bot.username or "").lower()
    mentioned = False
    for entity, value in message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items():
        if entity.type == MessageEntity.MENTION and value.lower() == "@" + username:
            mentioned = True
        elif entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and entity.user.id == bot.id:
            mentioned = True
    text = message.text
    parsed = parse_command(text.strip())
    if parsed is not None and username and parsed[2].lower() == username:
        mentioned = True  # /cmd@thisbot
    if username:
        stripped = re.sub(rf"@{re.escape(username)}(?![A-Za-z0-9_])", "", text, flags=re.IGNORECASE)
        stripped = re.sub(r"[ \t]{2,}", " ", stripped).strip()
        if stripped:
            text = stripped
    return text, mentioned


def message_kind(message: Message) -> str | None:
    """What a message without text is; None for service messages."""
    if message.sticker is not None:
        return "sticker"
    if message.photo:
        return "photo"
    if message.voice is not None or message.video_note is not None:
        return "voice"
    if message.effective_attachment:
        return "attachment"
    return None
