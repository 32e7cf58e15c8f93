#!/usr/bin/env bash
# The GPU check in one device call (bench/gpu_check.py says what it runs; docs/bench.md has the exact call):
#   device run: command "bash bench/gpu_check.sh", carry ["artifacts/carry"], timeout_s 540
# Results go to $OUT (set by the device tool), else artifacts/gpu_check. Extra arguments pass through
# (e.g. --dry-run on a machine without CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
exec env PYTHONUNBUFFERED=1 "$PY" -m bench.gpu_check --out "${OUT:-artifacts/gpu_check}" "$@"
