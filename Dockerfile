# syntax=docker/dockerfile:1.7
# Two images from one file (versions pinned by deploy/constraints.txt, which is why DL3013 is ignored
# on the two pip lines: hadolint cannot see a constraints file):
#   --target serve (default): the scoring service on an NVIDIA CUDA runtime base with onnxruntime-gpu and
#                             no torch; it runs on CPU where no GPU is visible, and says so in its log.
#   --target train:           the trainer (CPU torch), which trains, exports and publishes a model version.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# --- build the project's wheel once, for both images -------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md contract.py impressions.py sessions.py ./
COPY app ./app
COPY models ./models
COPY training ./training
COPY bench ./bench
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- trainer ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# the CPU build of torch (the default index would bring several GB of CUDA libraries)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=wheel /wheels /wheels
COPY deploy/constraints.txt /tmp/constraints.txt
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/*.whl)" && pip install -c /tmp/constraints.txt "${WHEEL}[train]" && rm -rf /wheels
RUN useradd --create-home --uid 10001 trainer
WORKDIR /home/trainer
COPY deploy/trainer.sh /usr/local/bin/trainer.sh
USER 10001
ENTRYPOINT ["sh", "/usr/local/bin/trainer.sh"]

# --- scorer (last stage: the default target) --------------------------------------------------------------
FROM ${CUDA_IMAGE} AS serve
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    MODEL_REPOSITORY=/models
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
COPY --from=wheel /wheels /wheels
COPY deploy/constraints.txt /tmp/constraints.txt
# hadolint ignore=DL3013
RUN WHEEL="$(ls /wheels/*.whl)" && pip install -c /tmp/constraints.txt "${WHEEL}[serve]" && rm -rf /wheels
RUN useradd --create-home --uid 10001 scorer
USER 10001
WORKDIR /home/scorer
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
CMD ["python3", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]
