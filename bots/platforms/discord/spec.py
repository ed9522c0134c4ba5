"""Discord registers itself (bots/platforms/registry.py); nothing here imports discord.py."""
from bots.platforms.registry import PlatformSpec, register_platform

SPEC = register_platform(PlatformSpec(
    name="discord",
    adapter="bots.platforms.discord.adapter:DiscordAdapter",
    token_var="DISCORD_BOT_TOKEN",
    config_section="discord",
    admin_ids=lambda config: config.admins.discord,
    can_answer_privately=True,           # a DM, unless the member blocks DMs from the server
    order=20,
))
