"""Mynah never joins a voice channel, so discord.py's start-up warnings about the voice
libraries ("PyNaCl is not installed, voice will NOT be supported", the same for davey, and
Python's DeprecationWarning for its audioop import) only alarm operators: the adapter calls
this before it makes a client. (Not in the package's __init__: discovering the platforms
must not import discord.py.)
"""
from __future__ import annotations

import warnings


def silence_voice_warnings() -> None:
    warnings.filterwarnings("ignore", message="'audioop' is deprecated", category=DeprecationWarning)
    try:
        from discord.voice_client import VoiceClient
    except ImportError:   # discord.py not installed: the adapter says so when it is used
        return
    VoiceClient.warn_nacl = False
    VoiceClient.warn_dave = False

