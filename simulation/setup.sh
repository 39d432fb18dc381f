#!/usr/bin/env bash
# Set up flowerbed on a fresh Debian/Ubuntu machine (idempotent):
#   - the Debian package with the Fashion-MNIST IDX files (offline data),
#   - a virtual environment .venv with flowerbed (editable) and its dev tools.
# Usage: bash simulation/setup.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FLOWERBED_FMNIST_DIR:-}" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[setup] installing the Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import flowerbed.common, flwr, torch, pytest, ruff" 2>/dev/null; then
  echo "[setup] installing flowerbed and its dependencies into .venv (torch 2.14.1 from local wheels)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import flwr, torch; print("flwr", flwr.__version__, "torch", torch.__version__)')"
