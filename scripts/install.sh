#!/usr/bin/env bash
# Install adapterserve into a virtual environment: torch first, then the project.
#
# The one install procedure: `make install` (and so CI) and the Dockerfile both run it.
#
#   scripts/install.sh VENV [--test] [--extras=a,b] [--editable] [--torch-only]
#
#   VENV        virtual environment to install into (created with $PYTHON when missing)
#   --test      also install the test extra (pytest, peft, ruff, ...)
#   --extras=a,b  also install these extras of pyproject.toml (the image's INSTALL_EXTRAS: ray, s3)
#   --editable  install the project in development mode (`pip install -e`)
#   --torch-only  stop after torch (an image build caches that layer apart from the sources)
#
# Environment:
#   PYTHON           interpreter that creates VENV (default: python3)
#   TORCH_INDEX_URL  index that torch is installed from, e.g. the PyTorch CPU or CUDA wheel index;
#                    empty: pip's configured indexes (which must then provide the build wanted)
#   PIP_*            pip's own settings (PIP_NO_CACHE_DIR=1 keeps images small)
#   BUILD_SECRETS    where an image build mounts its secrets (default /run/secrets): a `pip_conf`
#                    there becomes PIP_CONFIG_FILE (a package mirror), a `ca_bundle` PIP_CERT
set -euo pipefail

secrets=${BUILD_SECRETS:-/run/secrets}
if [[ -s $secrets/pip_conf ]]; then export PIP_CONFIG_FILE=$secrets/pip_conf; fi
if [[ -s $secrets/ca_bundle ]]; then export PIP_CERT=$secrets/ca_bundle; fi

TORCH_VERSION=2.13.0  # keep equal to the pin in pyproject.toml (tests/unit/test_deploy.py checks)

usage() { echo "usage: $0 VENV [--test] [--extras=a,b] [--editable] [--torch-only]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
venv=$1
shift
extras=()
mode=()
torch_only=""
for arg in "$@"; do
  case $arg in
    --test) extras+=(test) ;;
    --extras=*) IFS=, read -ra more <<<"${arg#--extras=}"; extras+=("${more[@]}") ;;
    --editable) mode=(-e) ;;
    --torch-only) torch_only=1 ;;
    *) usage ;;
  esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -x $venv/bin/python ]] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/pip" install -q)

# torch first, from the index that has the build wanted (CPU here and in CI), so that nothing
# installed below pulls another build in as a dependency. That index is an extra one: torch's own
# dependencies come from the configured index, and where the PyTorch index cannot be reached (a
# build machine with a local wheel directory) the local build is taken. Its local version label
# (2.13.0+cpu, +cu128) sorts above PyPI's plain 2.13.0, so the wanted build wins wherever it is.
if [[ -n ${TORCH_INDEX_URL:-} ]]; then
  "${pip[@]}" --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
  "${pip[@]}" "torch==$TORCH_VERSION"
fi
[[ -z $torch_only ]] || exit 0
extra=""
if [[ ${#extras[@]} -gt 0 ]]; then extra="[$(IFS=,; echo "${extras[*]}")]"; fi
"${pip[@]}" "${mode[@]}" "$root$extra"
