"""Telegram registers itself (bots/platforms/registry.py); nothing here imports python-telegram-bot."""
from bots.platforms.registry import PlatformSpec, register_platform

SPEC = register_platform(PlatformSpec(
    name="telegram",
    adapter="bots.platforms.telegram.adapter:TelegramAdapter",
    token_var="TELEGRAM_BOT_TOKEN",
    token_separator=":",                 # "<bot id>:<secret>": the bot id is public
    config_section="telegram",
    admin_ids=lambda config: config.admins.telegram,
    can_answer_privately=True,           # a user who pressed Start can be messaged privately
    optional_commands=frozenset({"start"}),   # Telegram's "Start" button
    forgets_for_chats=True,              # /forget @channel: its admins, checked with getChatMember
    order=10,                            # up in a second (getMe); Discord waits for its gateway first
    environ_kwargs={"TELEGRAM_WEBHOOK_SECRET": "webhook_secret"},   # the same on every worker of a webhook
))
