#!/usr/bin/env bash
# Install everything from scratch (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k parity -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
