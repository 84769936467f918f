#!/usr/bin/env bash
# The README's test command: set up (if needed), then the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# A real Prometheus for tests/e2e/test_prometheus.py (Debian's package; its tests skip, saying why, where it cannot be had)
if ! command -v prometheus >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; } >/dev/null 2>&1 \
    || echo "note: could not install prometheus; the Prometheus tests will be skipped" >&2
fi
exec python -m pytest -q "$@"
