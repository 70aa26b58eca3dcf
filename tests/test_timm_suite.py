"""timm's own model test suite (its tests/test_models.py, for the installed timm version) on the four variants."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_timm_test_models_passes_for_every_variant():
    """About 90 s on 2 CPU cores: 13 tests x 4 variants (TorchScript, fx, intermediates, pretrained, in_chans=1)."""
    run = subprocess.run(['bash', 'dev/timm_model_tests.sh', '-rfE'], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=1200)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ''
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = re.search(r'(\d+) passed', summary)
    assert passed and int(passed.group(1)) >= 4 * 13 and 'failed' not in summary and 'skipped' not in summary, summary
