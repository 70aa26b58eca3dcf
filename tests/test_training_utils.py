"""mpvit.training: the pieces every driver relies on for one-line errors and checkpoints that survive faults."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from helpers import REPO
from torch.utils.data import DataLoader, Dataset

from mpvit import CheckpointError, UserError
from mpvit.checkpoint import checkpoint_filter_fn
from mpvit.errors import InvalidInputError
from mpvit.training import ensure_writable_dir, error_line, save_atomic, user_errors_in_one_line


class _BadLabel(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise InvalidInputError(f'label /data/{index}.png holds values 200 outside the 150 classes')


def test_error_raised_in_a_worker_is_one_line():
    with pytest.raises(ValueError) as info:
        next(iter(DataLoader(_BadLabel(), num_workers=1)))
    assert len(str(info.value).splitlines()) > 1  # PyTorch wraps the worker's traceback into the message
    assert error_line(info.value) == 'label /data/0.png holds values 200 outside the 150 classes'
    assert error_line(ValueError('plain')) == 'plain'


def test_output_directory_is_created_or_refused(tmp_path):
    assert ensure_writable_dir(tmp_path / 'a' / 'b').is_dir()
    assert not list((tmp_path / 'a' / 'b').iterdir())  # the probe file is gone
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match=f'output directory {tmp_path / "file" / "out"} cannot be created'):
        ensure_writable_dir(tmp_path / 'file' / 'out')


def test_only_user_errors_are_one_line_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as info, user_errors_in_one_line():
        raise InvalidInputError('--epochs -1: must be positive')
    assert info.value.code == 2 and capsys.readouterr().err == 'error: --epochs -1: must be positive\n'
    for bug in (ValueError('bug'), KeyError('bug'), FileNotFoundError('bug')):
        with pytest.raises(type(bug)), user_errors_in_one_line():
            raise bug
    assert capsys.readouterr().err == ''
    assert issubclass(CheckpointError, UserError)


def test_a_bug_inside_a_driver_prints_its_traceback(tmp_path):
    """It used to print 'error: bug' with rc 2, like a user error."""
    image = tmp_path / 'x.png'
    from PIL import Image

    Image.new('RGB', (32, 32)).save(image)
    weights = tmp_path / 'w.pth'
    torch.save({'model': timm.create_model('mpvit_tiny').state_dict()}, weights)
    code = (f"import runpy, sys, mpvit.models.mpvit as m\n"
            f"def broken(self, x): raise ValueError('bug')\n"
            f"m.MPViT.forward_features = broken\n"
            f"sys.argv = ['predict.py', {str(image)!r}, '--model', 'mpvit_tiny', '--weights', {str(weights)!r}]\n"
            f"runpy.run_path({str(REPO / 'tools/predict.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and 'Traceback' in proc.stderr and 'ValueError: bug' in proc.stderr
    assert 'error: bug' not in proc.stderr


def test_checkpoint_write_failure_is_one_line_and_keeps_the_previous_one(tmp_path):
    """A full disk (here a file-size limit: the write fails with EFBIG) ends in one line, the temporary file is
    removed, and the checkpoint saved before is intact."""
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 0, 'w': torch.zeros(4)}, path)
    before = path.read_bytes()
    code = (f"import resource, signal, torch\n"
            f"from mpvit.training import save_atomic, user_errors_in_one_line\n"
            f"signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            f"with user_errors_in_one_line():\n"
            f"    save_atomic({{'epoch': 1, 'w': torch.zeros(1_000_000)}}, {str(path)!r})\n")
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f'error: cannot write {path}') and 'previous checkpoint' in last
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['checkpoint.pth']


def test_checkpoint_write_never_follows_a_planted_link(tmp_path):
    """The old fixed temporary name (checkpoint.pth.tmp) was followed: a link there overwrote its target."""
    target = tmp_path / 'elsewhere.txt'
    target.write_text('keep me')
    (tmp_path / 'checkpoint.pth.tmp').symlink_to(target)
    save_atomic({'epoch': 0}, tmp_path / 'checkpoint.pth')
    assert target.read_text() == 'keep me' and torch.load(tmp_path / 'checkpoint.pth')['epoch'] == 0


def test_another_variants_classifier_names_the_widths():
    """It said '(4 classes) does not fit the model's (4 classes)'."""
    xsmall = timm.create_model('mpvit_xsmall', num_classes=4).state_dict()
    with pytest.raises(CheckpointError, match=r"\(cls_head.cls.weight, cls_head.cls.bias: 4 classes from 256 "
                                              r"features\) does not fit the model's \(4 classes from 216 features\)"):
        checkpoint_filter_fn(xsmall, timm.create_model('mpvit_tiny', num_classes=4), head='require')


def test_loss_watch_names_the_step_and_the_last_finite_loss():
    from mpvit.errors import DivergenceError
    from mpvit.training import LossWatch

    watch = LossWatch()
    assert watch.check(torch.tensor(2.5), 'step 1') == 2.5
    with pytest.raises(DivergenceError, match=r'loss is nan at step 2 \(last finite loss 2.5 at step 1\)'):
        watch.check(torch.tensor(float('nan')), 'step 2')
    watch.check_weights({'a': torch.ones(2), 'steps': torch.tensor(3)}, 'the end of epoch 0')
    # A finite loss can still be followed by a step that overflows the weights: they are never saved.
    with pytest.raises(DivergenceError, match=r'the weights are not finite \(b\) at the end of epoch 0'):
        watch.check_weights({'a': torch.ones(2), 'b': torch.tensor([0.0, float('-inf')])}, 'the end of epoch 0')
