#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py of the installed timm version, from its PyPI sdist) on the
# MPViT models, run the way timm runs it for its own families:
#   - 'mpvit' (timm's module name of mpvit/models/entrypoints/mpvit.py, which registers the models) is added to
#     FEAT_INTER_FILTERS (the forward_intermediates / FeatureGetterNet tests);
#   - the pretrained tests load checkpoints in the released format from a private torch hub cache, because the
#     released weights cannot be downloaded here: synthetic tensors with the released keys and shapes, written
#     under the file names of the released URLs, so timm's own download path finds them cached.
# Arguments go to pytest (default: every MPViT case). Example: bash dev/timm_model_tests.sh -k mpvit_tiny
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
VERSION=$("$PY" -c 'import timm; print(timm.__version__)')
SUITE=$REPO/.cache/timm-tests/$VERSION

if [ ! -f "$SUITE/tests/test_models.py" ]; then
    DOWNLOAD=$(mktemp -d)
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "timm==$VERSION" -d "$DOWNLOAD" \
        || { echo "timm_model_tests.sh: could not download the timm==$VERSION sdist from PyPI" >&2; exit 2; }
    mkdir -p "$SUITE"
    tar -xzf "$DOWNLOAD"/timm-"$VERSION".tar.gz -C "$SUITE" --strip-components=1 "timm-$VERSION/tests"
    rm -rf "$DOWNLOAD"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp -r "$SUITE/tests" "$WORK/tests"
"$PY" - "$WORK" "$REPO" <<'EOF'
import sys
from pathlib import Path

import torch

work, repo = Path(sys.argv[1]), Path(sys.argv[2])
tests = work / 'tests' / 'test_models.py'
text = tests.read_text()
anchor = 'FEAT_INTER_FILTERS = [\n'
if anchor not in text:
    sys.exit(f'{tests}: no {anchor.strip()!r} list to add mpvit to (timm changed its test file)')
tests.write_text(text.replace(anchor, anchor + "    'mpvit',\n", 1))  # the module that registers the models
with open(work / 'tests' / 'conftest.py', 'a') as f:
    f.write('\nimport mpvit  # noqa: E402,F401  (registers the MPViT models with timm)\n')

sys.path.insert(0, str(repo / 'tests'))
from fidelity import golden, synth_state_dict  # noqa: E402

import mpvit  # noqa: E402,F401
from timm.models import get_pretrained_cfg  # noqa: E402

hub = work / 'torch' / 'hub' / 'checkpoints'
hub.mkdir(parents=True)
for variant in mpvit.MPVIT_ARCHS:
    url = get_pretrained_cfg(f'mpvit_{variant}').url
    weights = synth_state_dict(golden(f'manifest_mpvit_{variant}.json')['tensors'])
    torch.save({'model': weights}, hub / url.rsplit('/', 1)[-1])
EOF
cd "$WORK"
TORCH_HOME="$WORK/torch" MPVIT_WEIGHTS="$WORK/torch/hub/checkpoints" PYTHONPATH="$REPO" "$PY" -m pytest tests/test_models.py -p no:cacheprovider -q \
    -W ignore::pytest.PytestUnknownMarkWarning -k "${TIMM_TESTS_K:-mpvit}" "$@"
