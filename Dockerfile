# bnfold images. Targets:
#   serve (default, last stage)  slim CPU server with the shipped models/ (no torch, no compiler)
#   serve-gpu                    CUDA runtime + onnxruntime-gpu; picks the CUDA execution provider
#   train                        torch 2.13.0 CPU; reproduces models/digits at build time
# Take the bundle from the train stage instead of the repo: --build-arg MODELS_FROM=train
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG MODELS_FROM=repo-models

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# ---- dependencies only (cached until pyproject.toml or constraints.txt change) ----
FROM base AS serve-deps
COPY pyproject.toml constraints.txt ./
COPY scripts/requirements_from_pyproject.py scripts/
RUN python scripts/requirements_from_pyproject.py serve > requirements.txt \
    && pip install --no-compile -r requirements.txt -c constraints.txt

# ---- train: reproduces the bundle (docker build --target train .) ----
FROM base AS train
# The PyTorch CPU wheel index keeps torch on the CPU build (PyPI's Linux wheel is the CUDA one).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY pyproject.toml constraints.txt ./
COPY scripts/requirements_from_pyproject.py scripts/
RUN python scripts/requirements_from_pyproject.py train > requirements.txt \
    && pip install --no-compile --extra-index-url "${TORCH_INDEX_URL}" \
       -r requirements.txt -c constraints.txt
COPY README.md ./
COPY bnfold/ bnfold/
COPY service/ service/
COPY training/ training/
RUN pip install --no-compile --no-deps . \
    && bnfold-train train --name digits --seed 0 --quantize int8 --models-dir /app/models --runs-dir /tmp/runs \
    && bnfold-train verify /app/models/digits

# ---- where the serve image takes its models from ----
FROM scratch AS repo-models
COPY models/ /app/models/

FROM ${MODELS_FROM} AS models

# ---- serve-gpu: onnxruntime-gpu on a CUDA runtime base ----
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY scripts/requirements_from_pyproject.py scripts/
RUN python scripts/requirements_from_pyproject.py serve --gpu > requirements.txt \
    && pip install --no-compile -r requirements.txt -c constraints.txt
COPY README.md ./
COPY bnfold/ bnfold/
COPY service/ service/
COPY training/ training/
RUN pip install --no-compile --no-deps . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin bnfold
COPY --from=models /app/models/ /app/models/
ENV BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_MODELS_DIR=/app/models \
    BNFOLD_PROVIDER=cuda
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["bnfold-serve"]

# ---- serve (default): slim CPU image ----
FROM base AS serve
COPY --from=serve-deps /usr/local/lib/python3.11/site-packages /usr/local/lib/python3.11/site-packages
COPY --from=serve-deps /usr/local/bin /usr/local/bin
COPY pyproject.toml README.md ./
COPY bnfold/ bnfold/
COPY service/ service/
COPY training/ training/
RUN pip install --no-compile --no-deps . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin bnfold
COPY --from=models /app/models/ /app/models/
ENV BNFOLD_HOST=0.0.0.0 \
    BNFOLD_PORT=8000 \
    BNFOLD_MODELS_DIR=/app/models
USER 10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["bnfold-serve"]
