# CUDA runtime image serving loraplex. Build: docker build -t loraplex .
# Run:   docker run --gpus all -p 8000:8000 loraplex   (serves smollm2-135m with the two example adapters; add
#        more at run time through the admin API, or replace CMD: ... loraplex serve --host 0.0.0.0 --adapter NAME=/mnt/x)
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORAPLEX_CACHE=/var/cache/loraplex \
    LORAPLEX_STATE=/var/lib/loraplex \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# apt versions are not pinned: the base image tag pins the release, and its security updates should flow in.
# g++: `--quant int8/int4` on a CPU host compiles its native kernels at start-up (server/engine/native).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml requirements-assets.txt README.md ./
COPY adapters ./adapters
COPY server ./server
COPY training ./training
COPY examples ./examples

# torch from the CUDA index first, so the pinned version resolves to a CUDA build; then the project
# (bitsandbytes from the gpu extra; optimum and onnxruntime from the export extra, for `training export` and
# `serve --backend onnxruntime`) and the packages that carry the embedded models, without their deps.
# The project's own pins live in pyproject.toml; ".[gpu,export]" is this source tree, so DL3013 does not apply.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install ".[gpu,export]" \
    && pip install --no-deps -r requirements-assets.txt

# uid 10001: Ubuntu 24.04 images already have `ubuntu` at uid 1000, so `useradd --uid 1000` fails the build.
RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /var/cache/loraplex /var/lib/loraplex /adapters \
    && chown -R loraplex:loraplex /var/cache/loraplex /var/lib/loraplex /adapters
USER 10001:10001

# Prepare the embedded bases at build time (SmolLM2's GGUF is converted once into the cache).
RUN python -c "from pathlib import Path; from adapters import resolve_base; [resolve_base(n, Path('/var/cache/loraplex')) for n in ('smollm2-135m', 'minilm-l6')]"

EXPOSE 8000
# Runtime adapters are added from /adapters (mount a volume; --adapter-root) and persist under
# /var/lib/loraplex (mount one there to keep them across containers). SIGTERM drains for up to
# --shutdown-timeout (20 s): give `docker stop` / Kubernetes at least that (`docker stop -t 30`).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
ENTRYPOINT ["server"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--adapter-root", "/adapters", "--adapter", "chatbot-tech=/app/examples/adapters/chatbot-tech", "--adapter", "chatbot-trivia=/app/examples/adapters/chatbot-trivia"]
