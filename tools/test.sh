#!/usr/bin/env bash
# Installs whatever is missing, then runs the test suite (arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
