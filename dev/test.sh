#!/usr/bin/env bash
# Installs whatever is missing, then runs the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/install.sh
# One pytest worker per core (pytest-xdist), each with its share of the cores' threads (tests/conftest.py):
# most tests leave a core idle (start-up, data loading, compiling). `-n 0` runs them in this process.
exec "${PYTHON:-python3}" -m pytest -q -n auto "$@"
