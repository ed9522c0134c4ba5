"""Telegram feedback: `message_reaction` updates and the optional 👍/👎 buttons.

Telegram sends a `message_reaction` update with the user's complete new set of reactions
on a message, but only when `allowed_updates` asks for it, and in groups and supergroups
only when the bot is an administrator of the chat (docs/TELEGRAM.md). Anonymous reactions
(by a channel or an anonymous admin) carry no user and are not stored: consent and
/forget are per user. The buttons ([feedback] buttons) are an inline keyboard under the
first part of each generated reply; a press is answered at once ("Thanks!").
"""
from __future__ import annotations

import logging

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, ReactionTypeEmoji, Update
from telegram.ext import CallbackQueryHandler, ContextTypes, MessageReactionHandler

from bots.feedback import BUTTON_DATA
from bots.platforms.redaction import redact

log = logging.getLogger(__name__)

UPDATES = [Update.MESSAGE_REACTION, Update.CALLBACK_QUERY]   # added to the adapter's allowed_updates


def buttons_markup(recorder) -> InlineKeyboardMarkup | None:
    """The 👍/👎 keyboard, or None when [feedback] buttons is off."""
    if not recorder.buttons:
        return None
    return InlineKeyboardMarkup([[InlineKeyboardButton("👍", callback_data="fb:+"),
                                  InlineKeyboardButton("👎", callback_data="fb:-")]])


def _emoji(reaction) -> str:
    if isinstance(reaction, ReactionTypeEmoji):
        return reaction.emoji
    custom = getattr(reaction, "custom_emoji_id", None)
    return f"custom:{custom}" if custom else str(getattr(reaction, "type", "other"))


def register(application, adapter) -> None:
    """Add the reaction handler (and the button handler) to the PTB Application."""
    recorder = adapter.app.feedback
    platform = adapter.name

    async def on_reaction(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        event = update.message_reaction
        if event is None or event.user is None or event.user.is_bot:
            return
        try:
            await recorder.set_reactions(platform, event.chat.id, event.message_id, event.user.id,
                                         [_emoji(r) for r in event.new_reaction], user_name=event.user.full_name)
        except Exception as exc:  # feedback is never worth a crash
            log.warning("telegram: could not store a reaction: %s", redact(exc))

    async def on_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        value = BUTTON_DATA.get(query.data or "")
        message = query.message
        stored = 0
        if value is not None and message is not None:
            try:
                stored = await recorder.button(platform, message.chat.id, message.message_id, query.from_user.id,
                                               value, user_name=query.from_user.full_name)
            except Exception as exc:
                log.warning("telegram: could not store a button press: %s", redact(exc))
        try:
            await query.answer("Thanks!" if stored else None)
        except Exception as exc:  # cosmetic
            log.debug("telegram: answerCallbackQuery failed: %s", redact(exc))

    application.add_handler(MessageReactionHandler(on_reaction))
    application.add_handler(CallbackQueryHandler(on_button, pattern=r"^fb:[+-]$"))
