"""Hub names ("org/name") when the Hugging Face hub cannot be reached.

Why: transformers retries an unreachable hub five times with back-off for each file, so a
hub name on an offline machine took 49 s of doubled warnings before one error. Before a
hub name loads, this decides in a few seconds: from the cache only (HF_HUB_OFFLINE set, or
the hub's address does not answer), or a one-line error when the cache lacks it too.
"""
from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class HubUnavailable(RuntimeError):
    """A hub name that can be neither downloaded nor found in the cache."""


def is_hub_name(path: str) -> bool:
    """"org/name" that is no local path (what transformers would look up on the hub)."""
    return not Path(path).exists() and "/" in path and not path.startswith((".", "/", "~"))


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON",
                                                                                                     "YES", "TRUE"}


def _reachable(endpoint: str) -> bool:
    """The hub's host accepts a TCP connection within CONNECT_TIMEOUT_S (behind a proxy: assumed)."""
    if any(os.environ.get(name) for name in _PROXY_VARS):
        return True
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def hub_cache_only(name: str) -> bool:
    """True: load `name` with local_files_only (it is cached and the hub is out of reach);
    False: the hub answers. Raises HubUnavailable (one line) when neither works."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if _offline():
        if cached:
            return True
        raise HubUnavailable(f"{name!r} is not a local folder and HF_HUB_OFFLINE is set, and it is not in the "
                             f"Hugging Face cache: download it where the hub is reachable (hf download {name}) "
                             "or set [model] path to a local folder")
    if _reachable(constants.ENDPOINT):
        return False
    if cached:
        log.warning("the Hugging Face hub (%s) is unreachable: loading %s from the cache", constants.ENDPOINT, name)
        return True
    raise HubUnavailable(f"{name!r} is not a local folder and the Hugging Face hub ({constants.ENDPOINT}) is "
                         "unreachable, and it is not in the cache: connect this machine, download it elsewhere "
                         f"(hf download {name}), or set [model] path to a local folder")
