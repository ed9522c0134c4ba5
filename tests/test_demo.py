"""`mynah demo DIR --quick`: simulated users through the real learning loop end in a promotion."""
from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_demo_promotes_with_trust_defaults(tmp_path):
    folder = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "demo", str(folder), "--quick"],
                            capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "min_users = 5, max_user_share = 0.2, min_account_age_hours = 24" in out   # the shipped defaults
    assert "promoted, now serving v0002 (was v0001)" in out
    before, after = map(float, re.search(r"Held-out loss \(\d+ newest dialogues\): ([\d.]+) → ([\d.]+)", out).groups())
    assert after < before - 0.01
    held = int(re.search(r"(\d+) training / (\d+) held-out", out).group(2))
    assert held >= 5, out                       # a real yardstick, not one dialogue
    contributors = int(re.search(r"Contributors: (\d+) in the training data", out).group(1))
    assert contributors >= 5
    assert "held-out yardstick" in out
    assert (folder / "models" / "v0002").is_dir()
    with sqlite3.connect(folder / "mynah.sqlite3") as db:   # the accounts really were back-dated
        assert db.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 30


def test_demo_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "scripts.cli", "demo", str(tmp_path), "--quick"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"
