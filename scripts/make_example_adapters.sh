#!/usr/bin/env bash
# The command that made the shipped example adapters in examples/adapters/ (about 7 minutes on 2 CPU cores):
#   chatbot-tech    completion on smollm2-135m, chatterbot topics ai, coding, computers, tech_support
#   chatbot-trivia  completion on smollm2-135m, chatterbot topic trivia
#   sentiment       classification on minilm-l6, rotten-tomatoes (fresh vs rotten)
# Each folder's manifest.json holds its held-out figures (loss / perplexity before and after, or accuracy
# and F1) and the full train_config. Small ranks keep the folders at 1-2 MB.
# Usage: scripts/make_example_adapters.sh [OUT_DIR]   (PYTHON=... picks the interpreter; default .venv's)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=${1:-examples/adapters}
export LORAPLEX_CACHE=${LORAPLEX_CACHE:-$HOME/.cache/loraplex}

# Completion adapters: rank 8 on q_proj,v_proj, 60 steps of 8 rows; 15% of the pairs held out.
CHAT_FLAGS=(--base smollm2-135m --task completion --max-steps 60 --batch-size 8 --lr 2e-3
            --lora-r 8 --lora-alpha 16 --target-modules q_proj,v_proj --val-fraction 0.15 --seed 0)
# Classifier: rank 8 on query,key,value,dense + head, 150 steps of 32 rows; 2,048 reviews held out.
CLASSIFY_FLAGS=(--base minilm-l6 --task classification --max-steps 150 --batch-size 32 --lr 2e-3
                --lora-r 8 --lora-alpha 16 --max-length 64 --val-fraction 0.16 --eval-rows 2048
                --eval-batch-size 64 --seed 0)

train() {
  local name=$1
  shift
  local started=$SECONDS
  echo "==> training $name into $OUT/$name"
  "$PYTHON" -m training.cli lora --out "$OUT/$name" "$@" > /dev/null
  echo "==> $name done in $((SECONDS - started)) s"
}

train chatbot-tech "${CHAT_FLAGS[@]}" --data chatterbot:ai,coding,computers,tech_support
train chatbot-trivia "${CHAT_FLAGS[@]}" --data chatterbot:trivia
train sentiment "${CLASSIFY_FLAGS[@]}" --data rotten-tomatoes

"$PYTHON" - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

for manifest in sorted(Path(sys.argv[1]).glob("*/manifest.json")):
    data = json.loads(manifest.read_text())
    held, train = data["metrics"]["held_out"], data["metrics"]["train"]
    if data["task"] == "completion":
        figures = (f"held-out loss {held['base']['loss']} -> {held['adapter']['loss']}, "
                   f"perplexity {held['base']['perplexity']} -> {held['adapter']['perplexity']} ({held['rows']} rows)")
    else:
        figures = (f"held-out accuracy {held['accuracy']}, macro F1 {held['f1_macro']} "
                   f"(majority baseline {held['majority_baseline_accuracy']}, {held['rows']} rows)")
    print(f"{manifest.parent.name}: {figures}; {train['steps']} steps in {train['seconds']} s")
PY
