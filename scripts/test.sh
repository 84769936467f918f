#!/usr/bin/env bash
# The README's test command: set up (if needed), then the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec python -m pytest -q "$@"
