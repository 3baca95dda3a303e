# syntax=docker/dockerfile:1
# pgsage: one image for every role (api, worker, beat, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# HF_HUB_OFFLINE: the default embedding model ships inside a pip package; never reach the Hub at runtime.
# PYTHONPATH=/app: `pgsage migrate` finds alembic.ini and alembic/ next to the app package (app/cli.py ROOT),
#   and these are not part of the installed wheel, so the app is imported from the source tree in /app.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    PGSAGE_DATA_DIR=/var/lib/pgsage \
    PYTHONPATH=/app

WORKDIR /app

# CPU-only torch first (its own layer, cached across code changes), so `pip install .` finds torch
# already satisfied instead of pulling the much larger CUDA build from PyPI.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && rm -rf build ./*.egg-info

# Unprivileged runtime user; the data directory (beat schedule, scratch files) is the only writable path.
RUN groupadd --system --gid 10001 pgsage \
    && useradd --system --uid 10001 --gid pgsage --create-home --home-dir /home/pgsage pgsage \
    && mkdir -p /var/lib/pgsage \
    && chown pgsage:pgsage /var/lib/pgsage
USER 10001:10001

EXPOSE 8000
CMD ["pgsage", "api", "--host", "0.0.0.0", "--port", "8000"]
