# fusionrank images: one Dockerfile, three targets.
#
#   docker build -t fusionrank .                              CPU service (the default target)
#   docker build --target gpu -t fusionrank:gpu .             GPU service: onnxruntime-gpu, CUDA
#   docker build --target trainer -t fusionrank-trainer .     offline: train, export, publish
#
# docker-compose.yml builds and wires all three. The services run as an unprivileged user
# (uid 10001), read artifacts from /artifacts and take every other setting from FUSIONRANK_*
# variables (service/settings.py). tests/deploy/test_containers.py runs the CPU target's CMD
# with its ENV outside Docker; make compose-test builds the images and runs the whole stack in
# containers (tests/deploy/test_compose_stack.py; README, "Containers").

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# onnxruntime-gpu's CUDA 12 build needs the CUDA runtime and cuDNN 9 libraries.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# -- build: the online dependencies (no torch) and the project's wheel -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# Dependencies first, from pyproject.toml, so that a code change reuses this layer.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies']), file=open('requirements.txt', 'w')); \
print('\n'.join(p['optional-dependencies']['offline']), file=open('offline.txt', 'w'))" \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.txt
COPY models models
COPY export export
COPY service service
COPY loadtest loadtest
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# -- trainer: the offline stack, for the one-shot job that trains, exports and publishes ---------
FROM ${PYTHON_IMAGE} AS trainer
# PyPI's torch wheel for Linux bundles CUDA (gigabytes). For a CPU-only torch, build with
# --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index>, or hand a folder of wheels
# (say, a torch +cpu wheel) to the build as --build-arg PIP_FIND_LINKS=<URL of its listing>
# (make compose-test serves this machine's own over loopback and builds with --network host).
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUN groupadd --system --gid 10001 fusionrank \
 && useradd --system --uid 10001 --gid 10001 --create-home fusionrank \
 && mkdir -p /artifacts && chown 10001:10001 /artifacts
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/offline.txt /tmp/offline.txt
RUN pip install -r /tmp/offline.txt
USER 10001:10001
WORKDIR /home/fusionrank
# The catalogue is mounted at /data; artifacts (and the encoder cache) go to /artifacts.
CMD ["python", "-m", "export", "--data", "/data", "--out", "/artifacts"]

# -- gpu: the service on onnxruntime-gpu --------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --system --gid 10001 fusionrank \
 && useradd --system --uid 10001 --gid 10001 --no-create-home fusionrank \
 && mkdir -p /artifacts && chown 10001:10001 /artifacts
COPY --from=build /src/requirements.txt /tmp/requirements.txt
COPY --from=build /wheels /wheels
# onnxruntime and onnxruntime-gpu install the same module: never both in one environment.
RUN grep -v '^onnxruntime' /tmp/requirements.txt > /tmp/gpu.txt \
 && /opt/venv/bin/pip install -r /tmp/gpu.txt "onnxruntime-gpu>=1.20" \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl
# device=cuda: a GPU image that cannot use its GPU stays not-ready (503 naming the reason)
# instead of serving slowly on the CPU.
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FUSIONRANK_ARTIFACTS_DIR=/artifacts FUSIONRANK_HOST=0.0.0.0 FUSIONRANK_PORT=8000 \
    FUSIONRANK_DEVICE=cuda
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
CMD ["python", "-m", "service"]

# -- cpu: the service (the default target, so last) --------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 fusionrank \
 && useradd --system --uid 10001 --gid 10001 --no-create-home fusionrank \
 && mkdir -p /artifacts && chown 10001:10001 /artifacts
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    FUSIONRANK_ARTIFACTS_DIR=/artifacts FUSIONRANK_HOST=0.0.0.0 FUSIONRANK_PORT=8000
USER 10001:10001
EXPOSE 8000
# /readyz: 200 once the model is warm and the feature store serves its features.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
# SIGTERM (docker stop) drains in-flight requests for up to FUSIONRANK_SHUTDOWN_TIMEOUT_S.
CMD ["python", "-m", "service"]
