#!/usr/bin/env bash
# Set up (see setup.sh), then run the whole test suite: unit tests on tiny models and the
# integration tests on the real embedded bases. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${VENV:-.venv}
export LORAPLEX_CACHE=${LORAPLEX_CACHE:-$HOME/.cache/loraplex}
echo "==> hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
