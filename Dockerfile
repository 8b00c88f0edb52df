# Spectra server image (docs/deployment.md).
#   CPU (default):  docker build -t spectra:cpu .
#   CUDA:           docker build --build-arg VARIANT=cuda -t spectra:cuda .   then: docker run --gpus all ...
# The CPU variant takes torch from PyTorch's CPU index (no CUDA libraries, several GB smaller); the CUDA
# variant takes the default torch wheel from PyPI, which brings its own CUDA runtime as nvidia-* wheels,
# so one Python base serves both and only the NVIDIA driver has to come from the host.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
# Must match the torch pin in pyproject.toml (tests/test_deploy.py checks).
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, from the variant's index, so that `pip install .` finds its pin already satisfied.
RUN case "$VARIANT" in \
        cpu) pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" ;; \
        cuda) pip install "torch==${TORCH_VERSION}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY server ./server
COPY adapters_store ./adapters_store
COPY clients ./clients
# Every other package at the version `make test` ran on: the lock's pins, less torch (it came from the variant's
# index) and less the hashes (pip wants them on all or none, and torch's is the development machines' wheel).
RUN sed -n 's/^\([A-Za-z0-9][^ ]*==[^ ]*\) \\$/\1/p' requirements.lock | grep -v '^torch==' > /tmp/constraints.txt \
    && pip install --constraint /tmp/constraints.txt .

FROM ${PYTHON_IMAGE} AS runtime-cpu

FROM ${PYTHON_IMAGE} AS runtime-cuda
# Read by the NVIDIA Container Toolkit: every GPU, and the driver's compute libraries mounted in.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM runtime-${VARIANT}
COPY --from=build /opt/venv /opt/venv
# /data is created and owned by the user before VOLUME, so a fresh named volume starts writable by it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/spectra spectra \
    && mkdir /data \
    && chown spectra:spectra /data
# SPECTRA_MODEL (an HF model directory under /data or a hub id) is left unset: the server then generates
# its embedded default model into the data dir. Hub downloads are cached in the volume through HF_HOME.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SPECTRA_DATA_DIR=/data \
    SPECTRA_HOST=0.0.0.0 \
    SPECTRA_PORT=8080 \
    HF_HOME=/data/huggingface
VOLUME ["/data"]
USER spectra
WORKDIR /home/spectra
EXPOSE 8080
# /health answers 200 once the engine is ready and 503 before; urlopen raises on both 503 and a refused
# connection, so the check needs no curl. The start period covers a first hub download of a large model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SPECTRA_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["spectra", "serve"]
