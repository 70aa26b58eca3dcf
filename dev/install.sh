#!/usr/bin/env bash
# Sets up everything this repository needs, on a fresh machine or an already
# prepared one. Idempotent: what is installed at the pinned version is kept,
# only what is missing is installed. Used by tools/demo.sh and dev/test.sh.
#
#   PYTHON=python3.11 bash dev/install.sh     # choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
pip_install() { "$PY" -m pip install --quiet --root-user-action=ignore "$@"; }

# Upstream OpenMMLab packages share import directories with the onedl forks pinned here.
for upstream in mmcv mmcv-full mmcv-lite mmengine mmsegmentation; do
  if "$PY" -m pip show --quiet "$upstream" >/dev/null 2>&1; then
    echo "[install] upstream '$upstream' is installed; it clashes with the onedl-* forks in requirements.txt." >&2
    echo "[install] uninstall it first (pip uninstall $upstream), or see semantic_segmentation/README.md." >&2
    exit 1
  fi
done

echo "[install] pinned requirements (requirements.txt)"
# torch first and alone, so that no other requirement can choose its version.
pip_install torch==2.14.1 torchvision==0.29.1
pip_install -r requirements.txt
PYTHON=$PY bash dev/install_detectron2.sh

# The mpvit package itself, editable, once (checked from outside the checkout).
repo=$(pwd)
if ! (cd / && "$PY" -c "import mpvit, os, sys; sys.exit(os.path.dirname(os.path.dirname(mpvit.__file__)) != '$repo')") 2>/dev/null; then
  echo "[install] mpvit (editable)"
  pip_install --no-deps --no-build-isolation -e .
fi
echo "[install] done"
