#!/usr/bin/env bash
# README command 1: set up (first time only) and chat with Mynah in the console.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mynah chat "$@"
