import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ holds helpers (fidelity.py, helpers.py) imported by the test modules. The scripts of tools/ and dev/
# import their neighbours (paper_tables, benchmark), as the folder of a script that runs is on sys.path; loaded
# by the tests, theirs is not.
sys.path.insert(0, str(Path(__file__).parent))
sys.path += [str(Path(__file__).parents[1] / 'tools'), str(Path(__file__).parents[1] / 'dev')]


def pytest_configure(config):
    """Under pytest-xdist (dev/test.sh), each worker and the processes it starts get an equal share of the
    cores' threads: two workers with a thread per core each would make every torch op wait on the other's."""
    from mpvit.training import usable_cpus  # the CPUs this process may run on, as xdist's -n auto counts them

    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1 and 'OMP_NUM_THREADS' not in os.environ:  # a thread count the user set is kept
        threads = max(1, usable_cpus() // workers)
        os.environ['OMP_NUM_THREADS'] = str(threads)  # the processes tests start
        torch.set_num_threads(threads)


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
