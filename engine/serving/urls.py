"""URLs without their credentials: a `user:password@` in a backend's base_url must never reach
a log line, an error message, /status, or a learning run's rejection reason."""
from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit


def public_url(url: str) -> str:
    """The URL without user:password@, query or fragment (safe for logs and /status)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """(the URL without user:password@, (user, password) or None): HTTP clients log the URL
    they request, so the credentials travel as Basic auth instead (what httpx does with them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=netloc)), (unquote(parts.username or ""), unquote(parts.password or ""))


def redact(text: str, url: str) -> str:
    """`text` (an error message) with `url` written as its public form and any credential
    inside it (user, password, query; raw or %-decoded) replaced by ***."""
    parts = urlsplit(url)
    text = text.replace(url, public_url(url)).replace(url.rstrip("/"), public_url(url).rstrip("/"))
    secrets = {parts.password or "", parts.username or "", parts.query}
    secrets |= {unquote(s) for s in secrets}
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
