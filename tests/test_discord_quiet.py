"""Mynah uses no voice: discord.py's voice-library warnings must not greet the operator."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_voice_library_warnings_when_the_discord_client_starts():
    script = ("import logging; logging.basicConfig(level=logging.INFO)\n"
              "import bots.platforms.discord.adapter, discord\n"
              "discord.Client(intents=discord.Intents.default())\n"
              "logging.getLogger('discord.client').warning('client made')\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "client made" in done.stderr, done.stderr
    for noise in ("voice will NOT be supported", "PyNaCl", "davey", "audioop"):
        assert noise not in done.stderr, done.stderr
