#!/usr/bin/env bash
# The project's test command (README and .ci/run): set up .venv with the test extras, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh      # Debian packages: Xvfb, Chromium, the C++ toolchain (installs what is missing)
bash scripts/setup.sh test
# two workers (one per core of the CI machine), each test file whole on one worker (module fixtures export once)
.venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
