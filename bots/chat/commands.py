"""The one command table: every front end registers its commands from it.

Telegram's setMyCommands and handlers, Discord's slash commands and the /help text all
read `COMMANDS`, so a command is added (or described) in exactly one place. What each
command does lives in `ChatService` (user commands) and `AdminCommands` (admin ones).
"""
from __future__ import annotations

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
    admin: bool = False                 # admins only (checked by AdminCommands, audited)
    private: bool = False               # only the asker should see the answer (ephemeral)
    argument: Argument | None = None
    platforms: frozenset[str] | None = None   # None: offered everywhere


COMMANDS: tuple[Command, ...] = (
    # /start is Telegram's "Start" button; elsewhere /help says the same
    Command("start", "say hello", platforms=frozenset({"telegram", "console"})),
    Command("help", "what I can do"),
    Command("reset", "start our conversation afresh"),
    Command("forget", "delete everything you have said to me", private=True),
    Command("optout", "keep this chat out of my training"),
    Command("optin", "let this chat help me learn again"),
    Command("persona", "show or set my persona in this chat (/persona reset clears it)",
            argument=Argument("text", "the persona, e.g. \"a cheerful pirate\"; \"reset\" clears it")),
    Command("retrain", "fine-tune on logged chats now", admin=True, private=True),
    Command("status", "model, runs, queue, latency, uptime", admin=True, private=True),
    Command("rollback", "make the previous (or a given) version active", admin=True, private=True,
            argument=Argument("version", "the version to make active, e.g. v0003 (default: the previous one)")),
    Command("models", "list model versions and their metrics", admin=True, private=True),
    Command("promote", "serve a version that waits for approval", admin=True, private=True,
            argument=Argument("version", "the waiting version, e.g. v0004")),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}
# Derived views: name -> description.
USER_COMMANDS: dict[str, str] = {c.name: c.description for c in COMMANDS if not c.admin}
ADMIN_COMMANDS: dict[str, str] = {c.name: c.description for c in COMMANDS if c.admin}


def commands_for(platform: str, *, admin: bool | None = None) -> list[Command]:
    """The commands `platform` offers, in table order; `admin` filters on admin-only."""
    return [c for c in COMMANDS
            if (c.platforms is None or platform in c.platforms) and (admin is None or c.admin == admin)]


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
