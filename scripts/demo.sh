#!/usr/bin/env bash
# The main job: set up, then serve the embedded SmolLM2 base with the example adapters on 127.0.0.1:8000.
# Extra arguments go to `server serve` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV=${VENV:-.venv}
args=()
count=0
for dir in examples/adapters/*/; do
  dir=${dir%/}
  [ -f "$dir/adapter_config.json" ] || continue
  task=$("$VENV/bin/python" -c "import json,sys; print(json.load(open(sys.argv[1])).get('task',''))" "$dir/manifest.json")
  if [ "$task" = "completion" ]; then
    args+=(--adapter "$(basename "$dir")=$dir")
    count=$((count + 1))
  fi
done
echo "==> serving smollm2-135m with $count example adapters on http://127.0.0.1:8000 (Ctrl-C stops)"
exec "$VENV/bin/server" serve --base smollm2-135m "${args[@]}" "$@"
