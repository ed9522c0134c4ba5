"""The console registers itself: no token (it is `mynah chat`, not `mynah run`), and whoever
runs it owns the machine, so is an admin."""
from bots.platforms.registry import PlatformSpec, register_platform

SPEC = register_platform(PlatformSpec(
    name="console",
    adapter="bots.platforms.console:ConsolePlatform",
    admin_ids=None,
    rate_limited=False,                  # one operator, who may pipe a whole script in
    optional_commands=frozenset({"start"}),
))
