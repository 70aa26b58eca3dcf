import sys
from pathlib import Path

import pytest
import torch

# tests/ holds helpers (fidelity.py, helpers.py) imported by the test modules.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
