"""Every command, declared once: name, help, who may run it, and the handler that runs it.

/help, the command menus the platforms register (a bot command list, slash commands) and
the dispatch in ChatService all read `COMMANDS`. A record names its handler as "provider.method"; `bind(providers)`
turns the names into callables once, when the chat service is built, from the objects that
implement them (the user commands, the admin commands, the learning loop and its trust
keeper). A provider that is absent (no learning loop) leaves its commands unbound, and
they say so when asked. Every handler is `async (args, msg) -> list[Outgoing]`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Argument:
    """The one optional argument a command takes (shown as a slash-command option)."""

    name: str
    description: str


@dataclass(frozen=True)
class Command:
    name: str
    description: str
    handler: str                        # "provider.method", bound by `bind`
    admin: bool = False                 # admins only (checked by AdminCommands, audited)
    private: bool = False               # only the asker should see the answer (ephemeral)
    argument: Argument | None = None
    optional: bool = False              # offered only by platforms that list it (PlatformSpec.optional_commands)


COMMANDS: tuple[Command, ...] = (
    # /start is the "Start" button of some platforms; elsewhere /help says the same
    Command("start", "say hello", "user.command_help", optional=True),
    Command("help", "what I can do", "user.command_help"),
    Command("reset", "start our conversation afresh", "user.command_reset"),
    Command("forget", "delete everything you have said to me", "user.command_forget", private=True),
    Command("optout", "keep this chat out of my training", "user.command_optout"),
    Command("optin", "let this chat help me learn again", "user.command_optin"),
    Command("persona", "show or set my persona in this chat (/persona reset clears it)", "user.command_persona",
            argument=Argument("text", "the persona, e.g. \"a cheerful pirate\"; \"reset\" clears it")),
    Command("retrain", "fine-tune on logged chats now", "learning.retrain", admin=True, private=True),
    Command("status", "model, runs, queue, latency, uptime", "admin.command_status", admin=True, private=True),
    Command("rollback", "make the previous (or a given) version active", "learning.rollback",
            admin=True, private=True,
            argument=Argument("version", "the version to make active, e.g. v0003 (default: the previous one)")),
    Command("models", "list model versions and their metrics", "learning.models", admin=True, private=True),
    Command("promote", "serve a version that waits for approval", "trust.command_promote", admin=True, private=True,
            argument=Argument("version", "the waiting version, e.g. v0004")),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
# Derived views: name -> description.
USER_COMMANDS: dict[str, str] = {c.name: c.description for c in COMMANDS if not c.admin}
ADMIN_COMMANDS: dict[str, str] = {c.name: c.description for c in COMMANDS if c.admin}


def bind(providers: Mapping[str, object | None]) -> dict:
    """{command name: its handler} for every command whose provider is present."""
    bound = {}
    for command in COMMANDS:
        provider, _, method = command.handler.partition(".")
        owner = providers.get(provider)
        if owner is not None:
            bound[command.name] = getattr(owner, method)
    return bound


def commands_for(optional: Collection[str] = (), *, admin: bool | None = None) -> list[Command]:
    """The commands a platform offers (the optional ones it lists), in table order;
    `admin` filters on admin-only."""
    return [c for c in COMMANDS
            if (not c.optional or c.name in optional) and (admin is None or c.admin == admin)]


def parse_command(text: str) -> tuple[str, list[str], str] | None:
    """'/cmd@bot a b' -> ('cmd', ['a', 'b'], 'bot'); None when it is not a command."""
    if not text.startswith("/") or len(text) < 2:
        return None
    head, *args = text.split()
    name, _, target = head[1:].partition("@")
    return name.lower(), args, target


def help_text(is_admin: bool) -> str:
    lines = ["I'm Mynah, a chatty bot that learns from our conversations. Just talk to me!", ""]
    lines += [f"/{name} - {what}" for name, what in USER_COMMANDS.items()]
    if is_admin:
        lines += ["", "Admin:"] + [f"/{name} - {what}" for name, what in ADMIN_COMMANDS.items()]
    return "\n".join(lines)
