import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ holds helpers (fidelity.py, helpers.py) imported by the test modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope='session')
def _private_weights_dir(tmp_path_factory):
    """Weights found or downloaded by the tests go to a folder of their own, never the user's cache
    (subprocesses inherit it)."""
    previous = os.environ.get('MPVIT_WEIGHTS')
    os.environ['MPVIT_WEIGHTS'] = str(tmp_path_factory.mktemp('weights'))
    yield
    if previous is None:
        os.environ.pop('MPVIT_WEIGHTS', None)
    else:
        os.environ['MPVIT_WEIGHTS'] = previous


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
