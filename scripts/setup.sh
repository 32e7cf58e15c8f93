#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this project (editable) with the given extras.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh app   or   bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0          # CPU build; on a GPU machine install your CUDA torch first
.venv/bin/python -m pip install -q -e ".[${extras}]"
