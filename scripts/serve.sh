#!/usr/bin/env bash
# The README's main command: set up (if needed), then the disaggregated server (1P1D, on any hardware) on the
# default model (SmolLM2-135M-Instruct) at http://127.0.0.1:8000 (extra arguments go to `splitserve serve`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec splitserve serve --mode disaggregated "$@"
