"""Discord slash commands, generated from the one command table (`bots.chat.commands`).

Every command has the same body: hand the interaction to the cog's `run_command`, which
asks the shared ChatService. A command with an argument (rollback's version) gets one
optional string option, named and described by the table.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from bots.chat.commands import Command, commands_for
from bots.platforms.discord.spec import SPEC

RunCommand = Callable[[discord.Interaction, str, str], Awaitable[None]]


def slash_commands(run: RunCommand) -> list[app_commands.Command]:
    """One app command per table entry Discord offers, each calling `run(interaction, name, args)`."""
    return [slash_command(spec, run) for spec in commands_for(SPEC.optional_commands)]


def slash_command(spec: Command, run: RunCommand) -> app_commands.Command:
    description = ("(admin) " if spec.admin else "") + spec.description
    if spec.argument is None:
        async def callback(interaction: discord.Interaction) -> None:
            await run(interaction, spec.name, "")

        return app_commands.Command(name=spec.name, description=description, callback=callback)

    async def callback_with_argument(interaction: discord.Interaction, argument: str | None = None) -> None:
        await run(interaction, spec.name, argument or "")

    command = app_commands.Command(name=spec.name, description=description, callback=callback_with_argument)
    app_commands.rename(argument=spec.argument.name)(command)
    app_commands.describe(argument=spec.argument.description)(command)
    return command
