#!/usr/bin/env bash
# The main job: set up, then serve the embedded SmolLM2 base with the example adapters on 127.0.0.1:8000.
# Extra arguments go to `server serve` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${VENV:-.venv}
args=()
for dir in examples/adapters/*/; do
  dir=${dir%/}
  [ -f "$dir/adapter_config.json" ] || continue
  task=$("$VENV/bin/python" -c "import json,sys; print(json.load(open(sys.argv[1])).get('task',''))" "$dir/manifest.json")
  [ "$task" = "completion" ] && args+=(--adapter "$(basename "$dir")=$dir")
done
echo "==> serving smollm2-135m with ${#args[@]} / 2 example adapters on http://127.0.0.1:8000 (Ctrl-C stops)"
exec "$VENV/bin/server" serve --base smollm2-135m "${args[@]}" "$@"
