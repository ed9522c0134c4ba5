"""Platforms register themselves here (the way AstrBot's `register_platform_adapter` or
NoneBot2's adapters do), so the runner and the chat core never name one.

Each platform package has a small `spec` module that calls `register_platform(PlatformSpec(...))`.
It imports nothing of the platform's client library: `discover()` imports every package's
spec (found with pkgutil), and a platform's adapter module (with its client library) is
imported only when that platform is served, so a bot serving one platform never loads
another's library.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlatformSpec:
    name: str                           # the Incoming.platform it produces, its key in storage
    adapter: str = ""                   # "module:Class" of its Platform, built with (app, token)
    token_var: str | None = None        # the environment variable with its token; None: `mynah run` skips it
    token_separator: str | None = None  # a token's public prefix ends here (a bot id before ':')
    config_section: str | None = None   # its [section] of config.toml
    # Its admins' user ids from the config ([admins]); None: whoever runs it owns the machine.
    admin_ids: Callable[[Any], Iterable] | None = None
    can_answer_privately: bool = False  # it can message the asker privately (from a group)
    optional_commands: frozenset[str] = field(default_factory=frozenset)   # e.g. a "Start" button's /start
    # `/forget <chat>` works here: the adapter checks that the sender administers the named
    # chat (a channel whose posts are stored under its id) and says so in sender_is_chat_admin.
    forgets_for_chats: bool = False
    rate_limited: bool = True           # its users are rate-limited (not the console's operator)
    order: int = 100                    # `mynah run` starts platforms in this order (quick starters first)
    # Other secrets its adapter takes from the environment: variable -> the adapter's keyword argument.
    environ_kwargs: dict[str, str] = field(default_factory=dict)

    def admins(self, config) -> frozenset[str] | None:
        """The admins' ids as strings; None when everyone at this platform is one."""
        return None if self.admin_ids is None else frozenset(str(i) for i in self.admin_ids(config))

    def load_adapter(self) -> type:
        """The adapter class (importing the platform's client library only now)."""
        module, _, cls = self.adapter.partition(":")
        return getattr(importlib.import_module(module), cls)


_SPECS: dict[str, PlatformSpec] = {}
_discovered = False


def register_platform(spec: PlatformSpec) -> PlatformSpec:
    """Called by each platform's spec module; registering the same name twice is a bug."""
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"platform {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def discover() -> dict[str, PlatformSpec]:
    """Every platform package under bots.platforms that has a `spec` module, by name."""
    global _discovered
    if not _discovered:
        import bots.platforms as package

        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.ispkg and importlib.util.find_spec(info.name + ".spec") is not None:
                importlib.import_module(info.name + ".spec")
        _discovered = True
    return dict(sorted(_SPECS.items(), key=lambda item: (item[1].order, item[0])))


def platform(name: str) -> PlatformSpec | None:
    return discover().get(name)


def admin_ids(config) -> dict[str, frozenset[str] | None]:
    """{platform: its admins' ids (None: everyone there)} for every registered platform."""
    return {name: spec.admins(config) for name, spec in discover().items()}


def forgetting_for_chats() -> frozenset[str]:
    """The platforms whose adapters check `/forget <chat>` (see PlatformSpec.forgets_for_chats)."""
    return frozenset(name for name, spec in discover().items() if spec.forgets_for_chats)


def unlimited_platforms() -> frozenset[str]:
    """The platforms whose users are never rate-limited."""
    return frozenset(name for name, spec in discover().items() if not spec.rate_limited)


def served() -> dict[str, PlatformSpec]:
    """The platforms `mynah run` can serve (they have a token variable), by name."""
    return {name: spec for name, spec in discover().items() if spec.token_var}
