#!/usr/bin/env bash
# Headless, bounded Locust run against a server on loopback (default http://127.0.0.1:8000).
# Usage: ./loadtest/run.sh [--host URL] [--users N] [--run-time 60s]. Installs the loadtest extra if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
host=http://127.0.0.1:8000 users=4 run_time=60s
while [ $# -gt 0 ]; do
  case "$1" in
    --host) host=$2; shift 2 ;;
    --users) users=$2; shift 2 ;;
    --run-time) run_time=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$host" in http://127.*|http://localhost*|http://\[::1\]*) ;; *) echo "loopback hosts only" >&2; exit 2 ;; esac
[ -x "$VENV/bin/locust" ] || "$VENV/bin/python" -m pip install --quiet -e ".[loadtest]"
mkdir -p runs/loadtest
exec "$VENV/bin/locust" -f loadtest/locustfile.py --headless --host "$host" --users "$users" \
  --spawn-rate "$users" --run-time "$run_time" --stop-timeout 30 --csv runs/loadtest/locust --only-summary
