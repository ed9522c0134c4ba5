"""Commands are declared once (bots/chat/commands.py): each record names the handler that
runs it, the platforms register themselves (bots/platforms/registry.py), and the admin list
comes from each platform's spec."""
from __future__ import annotations

import pytest

from bots.chat.admin import AdminCommands
from bots.chat.commands import COMMANDS, bind, commands_for
from bots.chat.events import Incoming, answers_privately
from bots.chat.user_commands import UserCommands
from bots.config import parse_config
from bots.learning.commands import LearningCommands
from bots.learning.trust import Trust
from bots.platforms.registry import admin_ids, discover

PROVIDERS = {"user": UserCommands, "admin": AdminCommands, "learning": LearningCommands, "trust": Trust}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_command_names_a_handler_that_exists(command):
    provider, _, method = command.handler.partition(".")
    assert callable(getattr(PROVIDERS[provider], method, None)), f"/{command.name}: {command.handler} is missing"


def test_binding_skips_an_absent_provider():
    user = UserCommands(config=None, store=None, is_admin=lambda platform, user_id: False)
    bound = bind({"user": user, "learning": None})
    assert "help" in bound and "start" in bound
    assert "retrain" not in bound and "status" not in bound


def test_platforms_offer_the_optional_commands_their_spec_lists():
    specs = discover()
    assert "start" in [c.name for c in commands_for(specs["telegram"].optional_commands)]
    assert "start" not in [c.name for c in commands_for(specs["discord"].optional_commands)]
    assert [c.name for c in commands_for((), admin=True)] == ["retrain", "status", "rollback", "models", "promote"]


def test_admins_come_from_each_platforms_spec():
    config = parse_config({"admins": {"telegram": [11], "discord": ["22"]}})
    admins = admin_ids(config)
    assert admins["telegram"] == {"11"} and admins["discord"] == {"22"}
    assert admins["console"] is None                     # whoever runs the console owns the machine
    acl = AdminCommands(admins, store=None, engine=None)
    assert acl.is_admin("telegram", "11") and not acl.is_admin("discord", "11")
    assert acl.is_admin("console", "anyone") and not acl.is_admin("elsewhere", "11")


def test_answering_privately_is_decided_in_one_place():
    def asked(**kw):
        return Incoming(platform="p", chat_id="1", user_id="2", text="/models", **kw)

    assert answers_privately(asked(chat_type="group", can_answer_privately=True))
    assert not answers_privately(asked(chat_type="private", can_answer_privately=True))   # already private
    assert not answers_privately(asked(chat_type="group"))                                # the platform cannot
    assert not answers_privately(asked(chat_type="group", can_answer_privately=True, anonymous=True))


async def test_forget_for_a_chat_only_where_the_adapter_checks_the_target():
    """A Discord moderator (sender_is_chat_admin for the channel) must not erase any user by id."""
    class NoStorage:
        async def audit(self, *args):
            raise AssertionError("nothing to audit: refused before")

    user = UserCommands(None, NoStorage(), lambda platform, user_id: False, forgets_for_chats=frozenset({"telegram"}))
    msg = Incoming(platform="discord", chat_id="1", user_id="2", text="/forget 12345", chat_type="group",
                   sender_is_chat_admin=True)
    [answer] = await user.command_forget(["12345"], msg)
    assert "takes no argument here" in answer.text
