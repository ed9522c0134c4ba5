"""Platform-neutral messages: every adapter turns its platform's event into an Incoming
and sends back each Outgoing; everything in between is platform-blind."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Incoming:
    platform: str                 # "telegram", "discord", "console"
    chat_id: str                  # the platform's chat / channel / DM id
    user_id: str
    text: str | None              # None for stickers, photos, voice, attachments
    chat_type: str = "private"    # "private" or "group" (groups, supergroups, guild channels)
    user_name: str | None = None
    thread_id: str = ""           # forum topic / Discord thread: its own context
    chat_title: str | None = None
    message_id: str | None = None
    reply_to_message_id: str | None = None
    mentions_bot: bool = False
    reply_to_bot: bool = False
    answer_all: bool = False      # this chat/channel is configured to answer everything
    kind: str = "text"            # "text", "sticker", "photo", "voice", "attachment", "other"
    # group chats: whether the sender administers this chat (Telegram creator/administrator,
    # Discord manage-messages or manage-guild); None = not looked up. Adapters fill it for the
    # commands that change a group's settings (GROUP_ADMIN_COMMANDS).
    sender_is_chat_admin: bool | None = None
    anonymous: bool = False       # sent on behalf of a chat (anonymous group admin): no real user id
    can_answer_privately: bool = False   # the platform can message the asker privately (from a group)

    @property
    def is_private(self) -> bool:
        return self.chat_type == "private"


def answers_privately(msg: Incoming) -> bool:
    """Whether an answer meant for the asker alone (Outgoing.private) goes to their private
    chat: asked in a group, on a platform that can message them there, by a real user (an
    anonymous sender's id is the group's). The one place this is decided."""
    return msg.can_answer_privately and not msg.is_private and not msg.anonymous


GROUP_ADMIN_COMMANDS = frozenset({"optout", "optin", "reset", "persona"})


@dataclass
class Outgoing:
    text: str
    image: Path | None = None       # a picture to attach (loss curves)
    ephemeral: bool = False         # only the asker sees it, where the platform can do that
    private: bool = False           # must reach the asker only: from a group it goes to their private chat
    stored_id: int | None = None    # storage row of a bot reply: mark it sent / failed
    reply_to: str | None = None     # platform message id this answers


class PlatformStartError(RuntimeError):
    """A platform could not start (bad token, missing intent…); the message says what to fix.

    It lives with the neutral events so that adapters raise it and the runner catches it
    without either importing the other."""
