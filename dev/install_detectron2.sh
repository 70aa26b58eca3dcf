#!/usr/bin/env bash
# Installs Detectron2 v0.6 for the current interpreter; called by dev/install.sh. Idempotent.
#
# Detectron2 is not on PyPI under its own name. Two routes:
#  * DETECTRON2_SOURCE=<source dir | git+URL[@TAG]> installs upstream with its C++ ops (CUDA ones when
#    nvcc is found), e.g. DETECTRON2_SOURCE=git+https://github.com/facebookresearch/detectron2.git
#    A copy of the tree gets dev/patch_detectron2.py --upstream (no pkg_resources, which setuptools
#    >= 82 dropped; requirements unpinned), then builds with this interpreter's torch.
#  * otherwise the PyPI sdist pb1-detectron2==0.6 (upstream v0.6's Python code, without layers/csrc),
#    checked against its sha256, patched for today's numpy / Pillow / setuptools by
#    dev/patch_detectron2.py, built once into a pure-Python wheel cached in .cache/wheels/.
#    No C++ ops: rotated boxes, deformable convs and the fast COCO evaluator are unavailable;
#    none of this repository's configs needs them.
# Either way Detectron2 goes in with --no-deps: requirements.txt pins its dependencies, once.
# A Detectron2 that works is kept, whichever route installed it; one that does not, or one of the
# other route than DETECTRON2_SOURCE asks for, is refused (never a second install into one directory).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --root-user-action=ignore "$@"; }

SDIST_VERSION=0.6
SDIST_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
# Keyed by the patch script: a changed patch builds a new wheel.
WHEEL_DIR=.cache/wheels/$(sha256sum dev/patch_detectron2.py | cut -c1-12)
WHEEL=$WHEEL_DIR/pb1_detectron2-$SDIST_VERSION-py3-none-any.whl

# The modules our code needs, including the ones v0.6 breaks on today's stack.
healthy() {
  (cd / && "$PY" - <<'PY') >/dev/null 2>&1
import detectron2, detectron2.utils.analysis, detectron2.model_zoo
from detectron2.data.transforms import transform  # Image.LINEAR
from detectron2.evaluation import COCOEvaluator  # optional _C
assert detectron2.__version__.startswith("0.6"), detectron2.__version__
PY
}

installed=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(detectron2|pb1-detectron2)==' | tr '\n' ' ' || true)
installed=${installed% }
if [ -n "${DETECTRON2_SOURCE:-}" ] && [[ "$installed" == pb1-detectron2==* ]]; then
  echo "[install] DETECTRON2_SOURCE is set but $installed (the patched sdist) is installed; to switch," \
       "uninstall it first: $PY -m pip uninstall -y pb1-detectron2" >&2
  exit 1
fi
if healthy; then
  exit 0
fi
if [ -n "$installed" ]; then
  echo "[install] $installed is installed but does not import (see the health check in $0); not installing" \
       "a second Detectron2 over it. Uninstall it first: $PY -m pip uninstall -y ${installed%%==*}" >&2
  exit 1
fi
if [ -n "${DETECTRON2_SOURCE:-}" ]; then
  echo "[install] detectron2 from $DETECTRON2_SOURCE (official build, C++ ops; takes minutes)"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  case "$DETECTRON2_SOURCE" in
    git+*)
      url=${DETECTRON2_SOURCE#git+} ref=
      if [[ "$url" =~ ^(.*\.git)@([^/]+)$ ]]; then url=${BASH_REMATCH[1]} ref=${BASH_REMATCH[2]}; fi
      git clone --quiet --depth 1 ${ref:+--branch "$ref"} "$url" "$work/src" ;;
    *)
      [ -d "$DETECTRON2_SOURCE" ] || { echo "[install] DETECTRON2_SOURCE=$DETECTRON2_SOURCE: no such directory" >&2; exit 1; }
      cp -a "$DETECTRON2_SOURCE" "$work/src" ;;
  esac
  "$PY" dev/patch_detectron2.py --upstream "$work/src"
  # --no-build-isolation: its setup.py imports torch, which must be ours, never a fresh download.
  pip_install --no-deps --no-build-isolation "$work/src"
else
  if [ ! -f "$WHEEL" ]; then
    echo "[install] detectron2: building a wheel from the sdist pb1-detectron2==$SDIST_VERSION"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # --no-build-isolation: its setup.py imports torch, which must be ours, never a fresh download.
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      -d "$work" "pb1-detectron2==$SDIST_VERSION"
    sdist=$work/pb1-detectron2-$SDIST_VERSION.tar.gz
    echo "$SDIST_SHA256  $sdist" | sha256sum --check --quiet \
      || { echo "[install] sha256 mismatch for $sdist" >&2; exit 1; }
    tar -xzf "$sdist" -C "$work"
    "$PY" dev/patch_detectron2.py "$work/pb1-detectron2-$SDIST_VERSION" >/dev/null
    mkdir -p "$WHEEL_DIR"
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEEL_DIR" "$work/pb1-detectron2-$SDIST_VERSION"
  fi
  echo "[install] detectron2 (patched v$SDIST_VERSION wheel, $WHEEL)"
  pip_install --no-deps "$WHEEL"
fi
healthy || { echo "[install] detectron2 was installed but does not import; see dev/install_detectron2.sh" >&2; exit 1; }
