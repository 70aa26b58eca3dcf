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


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog='driver')
    parser.add_argument('-c', '--config')
    parser.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth (default: %(default)s)')
    parser.add_argument('--epochs', type=int, default=300)
    return parser


def test_one_yaml_bootstrap_for_every_driver(tmp_path, capsys):
    """The config's values become defaults (either spelling of a key), the command line wins, --help shows them;
    a bad file is one line naming it (both drivers parse through this one function)."""
    from mpvit.training import parse_args_with_config

    config = tmp_path / 'run.yaml'
    config.write_text('drop-path: 0.1\nepochs: 5\n')
    args = parse_args_with_config(_parser(), ['-c', str(config), '--epochs', '7'])
    assert (args.config, args.drop_path, args.epochs) == (str(config), 0.1, 7)
    assert parse_args_with_config(_parser(), ['--epochs', '2']).drop_path == 0.0
    with pytest.raises(SystemExit):
        parse_args_with_config(_parser(), ['--config', str(config), '--help'])
    assert 'stochastic depth (default: 0.1)' in capsys.readouterr().out
    for text, message in (('epochs: [1\n', f'--config {tmp_path / "bad.yaml"}: not valid YAML (line 2, column 1)'),
                          ('epoch: 1\n', f"{tmp_path / 'bad.yaml'}: unknown keys ['epoch']"),
                          ('- 1\n', f'{tmp_path / "bad.yaml"}: expected a mapping of argument names to values')):
        (tmp_path / 'bad.yaml').write_text(text)
        with pytest.raises(SystemExit) as info:
            parse_args_with_config(_parser(), ['-c', str(tmp_path / 'bad.yaml')])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 2, err  # usage + error
    with pytest.raises(SystemExit):
        parse_args_with_config(_parser(), ['-c', str(tmp_path / 'absent.yaml')])
    assert f'--config {tmp_path / "absent.yaml"}: No such file or directory' in capsys.readouterr().err


def _training_parts(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler, torch.amp.GradScaler('cpu', enabled=False)


def test_training_checkpoint_layout_and_resume(tmp_path):
    """One layout for every driver's training checkpoint (DeiT's / Deformable DETR's names), read back by one
    function: the training state, this process's RNG, and the log rows up to the checkpoint's epoch."""
    import argparse
    import json
    import random

    from mpvit.training import (
        CHECKPOINT_KEYS,
        LossWatch,
        epoch_row,
        read_log,
        restore_training_state,
        save_training_checkpoint,
        write_log,
    )

    model, optimizer, scheduler, scaler = _training_parts()
    rows = [epoch_row(e, {'loss': 1.0 / (e + 1)}, {'acc1': 50.0 + e}, step=2 * (e + 1)) for e in range(2)]
    assert rows[1] == {'epoch': 1, 'train_loss': 0.5, 'test_acc1': 51.0, 'step': 4}
    path = tmp_path / 'checkpoint.pth'
    save_training_checkpoint(path, model, optimizer, scheduler, scaler, epoch=1, step=4,
                             args=argparse.Namespace(lr=0.1), log=rows, watch=LossWatch(), extra={'classes': ['a']})
    state = torch.load(path, weights_only=True)
    assert set(state) == {*CHECKPOINT_KEYS, 'classes'} and state['lr_scheduler'] == scheduler.state_dict()
    assert state['args'] == {'lr': 0.1} and state['log'] == rows and len(state['rng']) == 1
    expected = random.random()  # what the next draw is after restoring the saved state

    # The log on disk has a row lost (epoch 1) and a row after the checkpoint (epoch 2): both are put right.
    write_log(tmp_path / 'log.txt', [rows[0], epoch_row(2, {'loss': 9.0}, {})])
    _, optimizer2, scheduler2, scaler2 = _training_parts(seed=1)
    resumed = restore_training_state(state, path, optimizer2, scheduler2, scaler2, tmp_path / 'log.txt')
    assert (resumed.epoch, resumed.step, resumed.log) == (2, 4, rows)
    assert random.random() == expected
    assert [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()] == rows
    assert read_log(tmp_path / 'log.txt', up_to_epoch=0) == rows[:1] and read_log(tmp_path / 'none', 5) == []
    assert scheduler2.state_dict() == scheduler.state_dict()
    for a, b in zip(optimizer.state_dict()['state'].values(), optimizer2.state_dict()['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # Classification checkpoints of the earlier layout ('scheduler') still resume.
    old = {('scheduler' if k == 'lr_scheduler' else k): v for k, v in state.items() if k != 'log'}
    assert restore_training_state(old, path, *_training_parts()[1:], tmp_path / 'log.txt').log == rows
    with pytest.raises(CheckpointError, match=r'^w\.pth is not a training checkpoint to resume \(no optimizer, '
                                              r'lr_scheduler, scaler, epoch\); start from its weights'):
        restore_training_state({'model': {}}, 'w.pth', *_training_parts()[1:], tmp_path / 'log.txt')
    with pytest.raises(ValueError, match='would replace the shared ones'):
        save_training_checkpoint(path, model, optimizer, scheduler, scaler, epoch=1, step=4, args=argparse.Namespace(),
                                 log=[], watch=LossWatch(), extra={'epoch': 3})


def test_non_finite_weights_are_never_saved(tmp_path):
    import argparse

    from mpvit.errors import DivergenceError
    from mpvit.training import LossWatch, save_training_checkpoint

    model, optimizer, scheduler, scaler = _training_parts()
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(DivergenceError, match=r'the weights are not finite \(weight\) at the end of epoch 3'):
        save_training_checkpoint(tmp_path / 'c.pth', model, optimizer, scheduler, scaler, epoch=3, step=1,
                                 args=argparse.Namespace(), log=[], watch=LossWatch())
    assert not (tmp_path / 'c.pth').exists()


def test_a_damaged_log_line_is_named(tmp_path):
    from mpvit.training import read_log

    (tmp_path / 'log.txt').write_text('{"epoch": 0}\n{"epo\n')
    with pytest.raises(InvalidInputError, match=r'log\.txt line 2: not a JSON object with an integer "epoch"'):
        read_log(tmp_path / 'log.txt', up_to_epoch=3)


def test_parameters_are_counted_once_and_only_trainable():
    from mpvit.training import count_parameters

    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(shared, shared, torch.nn.Linear(4, 1))
    model[2].bias.requires_grad_(False)
    assert count_parameters(model) == 20 + 4


def test_progress_lines_are_timestamped_on_stdout_from_the_main_process(capsys):
    """Both drivers log through their logger (set up by one function): the time, then the message, on the
    stream stdout is at that moment."""
    import re

    from mpvit.training import setup_logging

    logger = setup_logging('mpvit.test_driver')
    setup_logging('mpvit.test_driver')  # once per process however often a driver's main runs
    logger.info('epoch 0 [1/2] loss 0.5')
    assert re.fullmatch(r'\d\d:\d\d:\d\d epoch 0 \[1/2\] loss 0\.5\n', capsys.readouterr().out)


def test_default_loader_workers_fit_the_machine(monkeypatch):
    """The classification driver's default of 8 workers, at most one per usable CPU (torch warns above that)."""
    from helpers import load_script

    from mpvit import training

    monkeypatch.setattr(training, 'usable_cpus', lambda: 2)
    assert training.loader_workers(8) == 2 and training.loader_workers(1) == 1 and training.loader_workers(0) == 0
    cls_main = load_script('classification/main.py')
    assert cls_main.build_parser().parse_args([]).num_workers == 2
    assert cls_main.build_parser().parse_args(['--num-workers', '8']).num_workers == 8  # asked for: as asked


def test_ddp_gradients_keep_their_parameters_strides():
    """MPViT's channels-last maps give conv weights gradients of other strides, which DDP warns about (and copies
    with strided reads); align_gradient_strides lays them out as the parameters, values unchanged."""
    import warnings

    import torch.distributed as dist
    from helpers import free_port

    from mpvit.training import align_gradient_strides

    x = torch.randn(2, 3, 64, 64)
    plain = timm.create_model('mpvit_tiny', num_classes=3)
    plain(x).sum().backward()
    assert any(p.grad.stride() != p.stride() for p in plain.parameters())  # what the hook is for
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    dist.init_process_group('gloo', rank=0, world_size=1)
    try:
        for align in (True, False):  # DDP warns once per process: the aligned model first
            torch.manual_seed(0)
            model = timm.create_model('mpvit_tiny', num_classes=3)
            wrapped = torch.nn.parallel.DistributedDataParallel(align_gradient_strides(model) if align else model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                wrapped(x).sum().backward()
            stride_warnings = [w for w in caught if 'Grad strides do not match' in str(w.message)]
            assert bool(stride_warnings) != align
            if align:
                assert all(p.grad.stride() == p.stride() for p in model.parameters())
                torch.manual_seed(0)
                reference = timm.create_model('mpvit_tiny', num_classes=3)
                reference(x).sum().backward()
                for (name, a), b in zip(model.named_parameters(), reference.parameters()):
                    torch.testing.assert_close(a.grad, b.grad, msg=name)
    finally:
        dist.destroy_process_group()
