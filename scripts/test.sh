#!/usr/bin/env bash
# The project's test command (README and .ci/run): set up .venv with the test extras, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q tests "$@"
