# syntax=docker/dockerfile:1
#
# Two images from one file (docs/deploying.md):
#   docker build -t classifier-serve .                  # serving: ONNX Runtime GPU, no torch
#   docker build --target export -t classifier-export . # export: torch CPU build, python -m export
#
# The serving image takes its CUDA and cuDNN libraries from pip (the `cuda` extra), so a host
# with the NVIDIA container toolkit and a driver new enough for the CUDA major version of the
# onnxruntime-gpu wheel (1.31: CUDA 13, driver 580 or newer) runs it on the GPU; without a usable
# GPU, `--device auto` falls back to the CPU provider and says so in one log line.

ARG PYTHON_VERSION=3.11

# --- builder: the project's wheel and the serving virtual environment ----------------------
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY serve ./serve
COPY export ./export
# The local wheel by path (not by name), so no index can substitute another package for it;
# the build fails if anything pulled torch into the serving environment.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && wheel="$(find /wheels -name 'onnx_classifier_serving-*.whl')" \
    && /opt/venv/bin/pip install --no-cache-dir "${wheel}[serve,cuda]" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# --- serve (default target): python -m serve --model-repository /models ---------------------
FROM python:${PYTHON_VERSION}-slim AS serve
# No NVIDIA_VISIBLE_DEVICES here: `docker run --gpus` and Kubernetes' device plugin set it to
# the GPUs a container was given. Baked in as `all`, a container that asked for no GPU (a
# CPU-only pod, `docker run` without --gpus) on a host whose default runtime is nvidia's would
# see, and use, every GPU of the host, those given to other pods included.
# ORT_DISABLE_TELEMETRY: onnxruntime-gpu (1.31) otherwise starts Microsoft's 1DS telemetry and
# persists a device id and an SQLite file under $HOME/.cache. The user's home does not exist (and
# the root filesystem is read-only in deploy/kubernetes), so every start printed a coloured,
# non-JSON warning line ("Failed to persist telemetry device ID") into the JSON log stream.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --system --gid 10001 serve \
    && useradd --system --uid 10001 --gid serve --no-create-home --home-dir /nonexistent serve \
    && mkdir /models \
    && chown serve:serve /models
USER 10001:10001
WORKDIR /models
# 8001 gRPC (KServe v2, Classifier, health, reflection); 8002 Prometheus /metrics.
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-m", "serve.health", "127.0.0.1:8001", "--timeout", "5"]
ENTRYPOINT ["python", "-m", "serve"]
CMD ["--model-repository", "/models"]

# --- export: python -m export CKPT, with torch's CPU build ---------------------------------
FROM python:${PYTHON_VERSION}-slim AS export
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# ORT_DISABLE_TELEMETRY: as in the serving stage (parity checks run ONNX Runtime, and
# `docker run --user "$(id -u)"` gives a user with no home either).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1
COPY --from=builder /wheels /wheels
# torch first from its CPU index, so the [export] extra finds it satisfied and no CUDA build
# (several GB) is pulled in. DL3013: the second install is our own wheel, a file, not a name.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && wheel="$(find /wheels -name 'onnx_classifier_serving-*.whl')" \
    && pip install --no-cache-dir "${wheel}[export]" \
    && rm -rf /wheels
RUN groupadd --system --gid 10001 export \
    && useradd --system --uid 10001 --gid export --create-home --home-dir /home/export export
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["python", "-m", "export"]
CMD ["--help"]
