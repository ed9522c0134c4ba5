"""Database targets: a `postgresql://` URL or a SQLite path, and URLs safe to print."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def is_postgres(target: str) -> bool:
    return str(target).startswith(("postgresql://", "postgres://"))


def redact(target: str) -> str:
    """A URL without any password, for messages and logs (a path is returned as it is)."""
    try:
        parts = urlsplit(str(target))
        password = parts.password
    except ValueError:
        return "<unparsable database URL>"
    if password is None:
        return str(target)
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
