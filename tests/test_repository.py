"""What a fresh clone must carry besides code: the license pyproject.toml declares."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_license_file_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert declared == {"text": "MIT"} and text.startswith("MIT License")
    assert "the Mynah authors" in text and "WITHOUT WARRANTY OF ANY KIND" in text
