#!/usr/bin/env bash
# The project's test command (README and .ci/run): set up .venv with the test extras, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh      # Debian packages: Xvfb, Chromium, the C++ toolchain (installs what is missing)
bash scripts/setup.sh test
.venv/bin/python -m pytest -q tests "$@"
