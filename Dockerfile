# syntax=docker/dockerfile:1
# adapterserve image: CPU by default; the CUDA image from the same file with
#   docker build --build-arg TORCH_VARIANT=cu128 -t adapterserve:cuda .
# (or `docker compose -f docker-compose.yml -f docker-compose.gpu.yml build`). See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- build: a virtual environment made by the same install script CI runs ---------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu, or the CUDA build of the PyTorch wheel index (cu126, cu128, ...); the wheels carry CUDA itself
ARG TORCH_VARIANT=cpu
# the index torch comes from (an ARG, so a build can point it at a mirror); empty: pip's configured
# indexes, e.g. those of the pip_conf secret below
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/${TORCH_VARIANT}"
# extras of pyproject.toml to install as well: `ray` for `adapterserve serve --ray` (the compose
# profile `ray` builds adapterserve:0.1.0-ray with it), `s3` for an s3:// store; empty: neither
ARG INSTALL_EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY scripts/install.sh scripts/slim-venv.sh scripts/
# A package mirror and its CA bundle arrive as build secrets, never as layers or build args:
#   docker build --secret id=pip_conf,src=pip.conf --secret id=ca_bundle,src=ca.pem .
# install.sh uses them when present (PIP_CONFIG_FILE, PIP_CERT); without them pip's defaults apply.
# torch in a layer of its own: editing the sources does not download it again
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=ca_bundle \
    scripts/install.sh /opt/venv --torch-only
COPY pyproject.toml README.md ./
COPY adapters adapters
COPY store store
COPY service service
# pip's compiled bytecode stays: the runtime user cannot write it, and torch imports fast with it.
# slim-venv.sh then removes what serving never loads (1.5 GB -> 1.1 GB; see the script).
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=ca_bundle \
    scripts/install.sh /opt/venv --extras=${INSTALL_EXTRAS} \
 && scripts/slim-venv.sh /opt/venv

# -- runtime: the interpreter, the virtual environment and nothing else ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="adapterserve" \
      org.opencontainers.image.description="One frozen backbone, many hot-swapped adapters, mixed-task batches." \
      io.adapterserve.torch-variant="${TORCH_VARIANT}"
RUN groupadd --system --gid 10001 adapterserve \
 && useradd --system --uid 10001 --gid adapterserve --home-dir /data --no-create-home adapterserve \
 && mkdir -p /data \
 && chown adapterserve:adapterserve /data
COPY --from=build /opt/venv /opt/venv
# the demo tasks (2.6 MB), seeded into an empty store at first start as `make serve` does;
# ADAPTERSERVE_SEED_DIR= (empty) starts with an empty store instead
COPY examples /opt/adapterserve/examples
# Settings come from the environment (every ADAPTERSERVE_* variable of the README's table).
# Inside the container the service binds all interfaces; publish the port on the host's loopback
# (compose does) unless it is meant to be reachable. dtype auto is bfloat16 on a GPU.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    ADAPTERSERVE_HOST=0.0.0.0 \
    ADAPTERSERVE_PORT=8000 \
    ADAPTERSERVE_STORE=/data/store \
    ADAPTERSERVE_SEED_DIR=/opt/adapterserve/examples \
    ADAPTERSERVE_DEVICE=auto \
    ADAPTERSERVE_DTYPE=auto
# the store and the generated admin key (/data/store.admin-key) outlive the container
VOLUME ["/data"]
WORKDIR /data
USER adapterserve:adapterserve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('ADAPTERSERVE_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["adapterserve"]
CMD ["serve"]
