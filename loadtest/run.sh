#!/usr/bin/env bash
# One bounded load run, servers included, to a report folder (loadtest/run.py says what it holds).
# Usage: ./loadtest/run.sh [--users 8] [--run-time 60s] [--swaps 3] [--out DIR] [--seed 0] ... (--help)
# The figure run: ./loadtest/run.sh --users 8 --run-time 5m --swaps 12
# Everything listens on 127.0.0.1 only. Installs the loadtest extra (Locust) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/locust" ] || "$VENV/bin/python" -m pip install --quiet -e ".[loadtest]"
exec "$VENV/bin/python" -m loadtest.run "$@"
