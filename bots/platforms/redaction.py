"""Keeping secrets (bot tokens, webhook secrets) out of every log line and error message.

One process-wide list of secrets, filled by whoever holds one (the runner for every
configured token, each adapter for its own), and one log-record factory that scrubs them
from every record: PTB logs its API URL (which holds the Telegram token) at DEBUG, httpx
logs request URLs at INFO, and a Bot's repr shows its token.
"""
from __future__ import annotations

import logging
import threading

MIN_SECRET_CHARS = 8            # shorter strings would redact ordinary text

# (secret, placeholder) pairs, longest first; replaced whole (never mutated) so a log call on
# another thread always iterates a consistent tuple.
_secrets: tuple[tuple[str, str], ...] = ()
_lock = threading.Lock()
_installed = False


def register_secret(secret: str, label: str = "<secret>") -> None:
    """From now on `secret` is shown as `label` in logs and in `redact()`."""
    global _secrets
    secret = (secret or "").strip()
    if len(secret) < MIN_SECRET_CHARS:
        return
    with _lock:
        known = dict(_secrets)
        known.setdefault(secret, label)
        _secrets = tuple(sorted(known.items(), key=lambda pair: len(pair[0]), reverse=True))
    install_log_redaction()


def register_token(token: str, label: str, *, separator: str | None = None) -> None:
    """A bot token; with `separator`, the part after it is registered too (a Telegram
    token is "<public bot id>:<secret>", and the secret half alone must not leak either)."""
    register_secret(token, label)
    if separator and separator in (token or ""):
        register_secret(token.partition(separator)[2], label)


def redact(value: object) -> str:
    """str(value) with every registered secret replaced by its placeholder."""
    text = str(value)
    for secret, label in _secrets:
        if secret in text:
            text = text.replace(secret, label)
    return text


def install_log_redaction() -> None:
    """Scrub the registered secrets from every log record of the process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            if _secrets:
                redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def redact_record(record: logging.LogRecord) -> None:
    """Rewrite one record's message (and its formatted traceback) without the secrets."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string is the logger's problem, not ours
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        clean = redact(text)
        if clean != text:
            record.exc_text = clean
