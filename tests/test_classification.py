"""classification/main.py end to end on tiny ImageFolders written here (CPU, real code paths)."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from helpers import REPO, assert_scores, free_port, load_script

from mpvit import CheckpointError
from mpvit.demo_data import write_shapes_imagefolder
from mpvit.errors import DivergenceError, InvalidInputError
from mpvit.serialization import safe_load
from mpvit.training import CHECKPOINT_KEYS, read_log

MAIN = REPO / 'classification' / 'main.py'
cls_main = load_script('classification/main.py')

# DeiT recipe on, at toy scale: every random component (RandAugment, mixup/cutmix, erasing,
# repeated augmentation, drop path) takes part, so resume must restore all their state.
SMALL = ['--model', 'mpvit_tiny', '--input-size', '48', '--batch-size', '4', '--num-workers', '0',
         '--amp', 'none', '--warmup-epochs', '1', '--lr', '1e-3', '--drop-path', '0.1', '--log-interval', '1']


def run(data, out, *extra):
    return cls_main.main(cls_main.parse_args([*SMALL, '--data-path', str(data), '--output-dir', str(out), *extra]))


@pytest.fixture(scope='module')
def two_class(tmp_path_factory):
    return write_shapes_imagefolder(tmp_path_factory.mktemp('data'), num_classes=2, train_per_class=8,
                                    val_per_class=4, size=48)


def test_train_eval_and_checkpoint_round_trip(two_class, tmp_path, capsys):
    result = run(two_class, tmp_path, '--epochs', '1', '--max-steps', '2')
    assert_scores(result, 'acc1', 'acc5', 'best_acc1')
    assert math.isfinite(result['loss']) and result['images'] == 8
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)  # no pickled objects in our checkpoints
    assert state['epoch'] == 0 and state['step'] == 2
    # The layout every driver's training checkpoint shares, plus what the weights need on their own.
    assert set(state) == {*CHECKPOINT_KEYS, 'best_acc1', 'pretrained_cfg'}
    rows = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    assert rows == state['log'] and [row['epoch'] for row in rows] == [0] and rows[0]['step'] == 2
    assert rows[0]['test_acc1'] == pytest.approx(result['acc1']) and math.isfinite(rows[0]['train_loss'])

    evaluated = run(two_class, tmp_path / 'eval', '--eval', '--resume', str(tmp_path / 'checkpoint.pth'))
    assert evaluated['acc1'] == pytest.approx(result['acc1'])
    assert evaluated['loss'] == pytest.approx(result['loss'], rel=1e-5)
    assert f"* Acc@1 {result['acc1']:.3f}" in capsys.readouterr().out
    written = json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())
    assert written['acc1'] == pytest.approx(result['acc1'])


@pytest.mark.parametrize('workers', [0, 2])
def test_interrupted_run_resumes_to_the_same_model(two_class, tmp_path, workers):
    """Bit-identical resume, also with data-loader worker processes (their seeds come from the restored RNG)."""
    common = ('--epochs', '3', '--max-steps', '2', '--deterministic', '--num-workers', str(workers))
    uninterrupted = tmp_path / 'a'
    run(two_class, uninterrupted, *common)
    interrupted = tmp_path / 'b'
    run(two_class, interrupted, *common, '--run-epochs', '1')
    assert safe_load(interrupted / 'checkpoint.pth')['epoch'] == 0
    (interrupted / 'log.txt').unlink()  # killed between the checkpoint and its log row: the row comes back
    run(two_class, interrupted, *common, '--run-epochs', '1', '--auto-resume')
    # A row of an epoch after the checkpoint (a run killed before saving it, say) is dropped on resume.
    with open(interrupted / 'log.txt', 'a') as f:
        f.write(json.dumps({'epoch': 2, 'train_loss': 0.0}) + '\n')
    assert [row['epoch'] for row in read_log(interrupted / 'log.txt', up_to_epoch=9)] == [0, 1, 2]
    run(two_class, interrupted, *common, '--auto-resume')
    assert (interrupted / 'log.txt').read_text() == (uninterrupted / 'log.txt').read_text()

    a = safe_load(uninterrupted / 'checkpoint.pth')
    b = safe_load(interrupted / 'checkpoint.pth')
    assert a['epoch'] == b['epoch'] == 2 and a['step'] == b['step'] == 6
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for pid, slots in a['optimizer']['state'].items():
        for name, value in slots.items():
            assert torch.equal(value, b['optimizer']['state'][pid][name]), (pid, name)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(two_class, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           str(MAIN), *SMALL, '--data-path', str(two_class), '--output-dir', str(tmp_path),
           '--epochs', '1', '--max-steps', '2', '--device', 'cpu']
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = safe_load(tmp_path / 'checkpoint.pth')
    assert state['step'] == 2 and len(state['rng']) == 2
    printed = re.search(r'\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+) \(8 images\)', proc.stdout)  # each once over 2 ranks
    assert printed, proc.stdout[-2000:]
    assert_scores(dict(acc1=float(printed[1]), acc5=float(printed[2])), 'acc1', 'acc5')
    assert math.isfinite(float(printed[3]))


def test_checkpoint_of_the_old_layout_resumes(two_class, tmp_path):
    """Checkpoints written before the drivers shared one layout named the schedule 'scheduler'; those without
    log rows keep the rows already in the log."""
    run(two_class, tmp_path, '--epochs', '2', '--run-epochs', '1', '--max-steps', '1')
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    state['scheduler'] = state.pop('lr_scheduler')
    del state['log']
    torch.save(state, tmp_path / 'checkpoint.pth')
    result = run(two_class, tmp_path, '--epochs', '2', '--max-steps', '1', '--auto-resume')
    assert 'acc1' in result
    assert [row['epoch'] for row in read_log(tmp_path / 'log.txt', up_to_epoch=9)] == [0, 1]
    assert 'lr_scheduler' in torch.load(tmp_path / 'checkpoint.pth', weights_only=True)


def test_divergence_stops_before_anything_is_saved(two_class, tmp_path):
    with pytest.raises(DivergenceError, match=r'loss is (nan|inf) at epoch 0 step [2-4]/4 \(last finite loss '
                                              r'\S+ at epoch 0 step [1-3]/4\)'):
        run(two_class, tmp_path, '--epochs', '1', '--max-steps', '4', '--warmup-epochs', '0', '--lr', '1e30')
    assert not (tmp_path / 'checkpoint.pth').exists()


def test_missing_and_empty_data_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere' / 'val')):
        run(tmp_path / 'nowhere', tmp_path / 'out', '--epochs', '1')
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32)
    (data / 'train' / 'disc').rename(tmp_path / 'moved')
    (data / 'train' / 'disc').mkdir()
    with pytest.raises(ValueError, match=r"data: 1 class folders have no image: train/disc; add images"):
        run(data, tmp_path / 'out', '--epochs', '1')


def test_every_folder_problem_is_counted_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    """An empty class folder and differing class sets: one line, before any model (an empty val/ class folder
    was found only after the model was built); the command lists them, and warns of an empty file."""
    from mpvit.check_data import main as check_data

    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=1, size=32)
    (data / 'val' / 'extra').mkdir()
    (data / 'train' / 'disc' / 'empty.JPEG').write_bytes(b'')
    monkeypatch.setattr(cls_main, 'build_model', lambda *a, **k: pytest.fail('model built before the check'))
    with pytest.raises(ValueError, match=r"data: 1 class folders have no image: val/extra; add images .* "
                                         r"\(\+1 more kinds of problem: `python -m mpvit.check_data imagefolder "):
        run(data, tmp_path / 'out', '--epochs', '1')
    assert check_data(['imagefolder', str(data)]) == 1
    out = capsys.readouterr().out
    assert "train/ and val/ class sets differ: only in train/ [], only in val/ [extra]" in out
    assert 'warning: ' in out and '1 image files are empty (0 bytes): train/disc/empty.JPEG' in out
    (data / 'val' / 'extra').rmdir()
    (data / 'train' / 'disc' / 'empty.JPEG').unlink()
    assert check_data(['imagefolder', str(data)]) == 0


def test_unreadable_val_images_are_left_out_and_counted(tmp_path, capsys):
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=3, size=48)
    (data / 'val' / 'disc' / 'broken.JPEG').write_bytes(b'not an image')
    (data / 'val' / 'square' / 'broken.JPEG').write_bytes(b'')
    model = timm.create_model('mpvit_tiny', num_classes=2)
    torch.save({'model': model.state_dict()}, tmp_path / 'weights.pth')
    for workers in ('0', '2'):
        metrics = run(data, tmp_path / 'out', '--eval', '--resume', str(tmp_path / 'weights.pth'), '--batch-size', '4',
                      '--num-workers', workers)
        assert metrics['images'] == 6 and metrics['unreadable_images'] == 2, metrics
        assert '(6 images; 2 unreadable left out)' in capsys.readouterr().out
        written = json.loads((tmp_path / 'out' / 'eval_metrics.json').read_text())
        assert written['images'] == 6 and written['unreadable_images'] == 2


def test_unreadable_training_set_is_refused_and_16_bit_images_are_scaled(tmp_path):
    import numpy as np
    from PIL import Image

    from mpvit.errors import InvalidInputError

    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=2, val_per_class=1, size=32)
    grey = data / 'val' / 'disc' / 'grey16.png'
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(grey)
    folder = cls_main.CheckedImageFolder(str(data / 'val'))
    assert folder[folder.samples.index((str(grey), 0))][0].getpixel((0, 0)) == (128, 128, 128)  # not clipped white
    for path in (data / 'train').rglob('*.*'):
        path.write_bytes(b'')
    with pytest.raises(InvalidInputError, match=r'data/train: none of its 4 images can be read'):
        run(data, tmp_path / 'out', '--epochs', '1')


def test_head_that_does_not_fit_is_refused_for_eval_and_resume(two_class, tmp_path, caplog):
    four = timm.create_model('mpvit_tiny', num_classes=4)
    torch.save({'model': four.state_dict()}, tmp_path / 'four.pth')
    with pytest.raises(CheckpointError, match=r'four\.pth.*cls_head\.cls\.weight.*4 classes.*2 classes'):
        run(two_class, tmp_path / 'eval', '--eval', '--resume', str(tmp_path / 'four.pth'))
    run(two_class, tmp_path / 'four', '--epochs', '1', '--max-steps', '1')
    state = torch.load(tmp_path / 'four' / 'checkpoint.pth', weights_only=True)
    state['model'] = four.state_dict()
    torch.save(state, tmp_path / 'four_train.pth')
    with pytest.raises(CheckpointError, match='4 classes.*2 classes'):
        run(two_class, tmp_path / 'resume', '--epochs', '2', '--resume', str(tmp_path / 'four_train.pth'))
    # Fine-tuning resets the classifier, visibly; the backbone is loaded.
    with caplog.at_level(logging.WARNING):
        run(two_class, tmp_path / 'finetune', '--epochs', '1', '--max-steps', '1', '--pretrained',
            str(tmp_path / 'four.pth'))
    assert any('4 classes' in r.getMessage() and 'freshly initialised' in r.getMessage() for r in caplog.records)


def test_bad_arguments_fail_before_any_work(two_class, tmp_path, capsys):
    for extra, message in (
            (['--accum-steps', '0'], '--accum-steps 0: must be at least 1'),
            (['--epochs', '-1'], '--epochs -1: must be at least 1'),
            (['--model', 'mpvit_huge'], '--model mpvit_huge: unknown model'),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run(two_class, tmp_path / 'out', '--epochs', '1', *extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / 'bad.yaml').write_text('epochs: [1\n')
    with pytest.raises(SystemExit):
        run(two_class, tmp_path / 'out', '-c', str(tmp_path / 'bad.yaml'))
    assert re.search(r'--config .*bad.yaml: not valid YAML \(line 2, column 1\)', capsys.readouterr().err)
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(ValueError, match=f'output directory {tmp_path / "a_file" / "out"} cannot be created'):
        run(two_class, tmp_path / 'a_file' / 'out', '--epochs', '1')
    (tmp_path / 'dir.pth').mkdir()
    with pytest.raises(CheckpointError, match='dir.pth is a directory, not a checkpoint file'):
        run(two_class, tmp_path / 'out', '--eval', '--resume', str(tmp_path / 'dir.pth'))


def test_train_val_class_mismatch_names_the_classes(tmp_path):
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=32)
    (data / 'val' / 'disc').rename(data / 'val' / 'circle')
    with pytest.raises(ValueError, match=r"only in train/ \[disc\], only in val/ \[circle\]"):
        run(data, tmp_path / 'out', '--epochs', '1')


def test_corrupt_image_is_skipped_and_training_continues(tmp_path, caplog):
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=2, size=48)
    bad = data / 'train' / 'disc' / 'broken.JPEG'
    bad.write_bytes(b'not an image')
    result = run(data, tmp_path / 'out', '--epochs', '1', '--no-repeated-aug', '--batch-size', '9',
                 '--mixup', '0', '--cutmix', '0')
    assert torch.isfinite(torch.tensor(result['loss']))
    assert any('broken.JPEG' in r.getMessage() for r in caplog.records)


def test_odd_batch_with_mixup_is_refused(two_class, tmp_path):
    with pytest.raises(ValueError, match='must be even'):
        run(two_class, tmp_path, '--epochs', '1', '--batch-size', '3')


def test_checkpoint_of_another_variant_is_refused(two_class, tmp_path):
    small = timm.create_model('mpvit_xsmall', num_classes=2)
    torch.save({'model': small.state_dict()}, tmp_path / 'xsmall.pth')
    with pytest.raises(CheckpointError, match='does not fit'):
        run(two_class, tmp_path / 'out', '--eval', '--resume', str(tmp_path / 'xsmall.pth'))


def test_throughput_mode_reports(tmp_path, capsys):
    result = run('', tmp_path, '--throughput', '--batch-size', '2')
    assert result['images_per_s'] > 0 and result['peak_memory_gib'] > 0
    assert 'images/s' in capsys.readouterr().out
    assert json.loads((tmp_path / 'throughput.json').read_text())['batch_size'] == 2


@pytest.mark.slow
def test_compiled_training_saves_plain_checkpoints(two_class, tmp_path):
    """--compile wraps the model for training and evaluation; checkpoints keep the released key layout."""
    result = run(two_class, tmp_path, '--epochs', '1', '--max-steps', '2', '--compile', 'aot_eager')
    assert result['images'] > 0 and 0 <= result['acc1'] <= 100
    keys = safe_load(tmp_path / 'checkpoint.pth')['model'].keys()
    assert 'stem.0.conv.weight' in keys and not [k for k in keys if '_orig_mod' in k]


def test_model_ema_is_evaluated_saved_and_resumed(two_class, tmp_path):
    result = run(two_class, tmp_path, '--epochs', '2', '--run-epochs', '1', '--max-steps', '2', '--model-ema',
                 '--model-ema-decay', '0.5')
    assert 0 <= result['ema_acc1'] <= 100
    state = torch.load(tmp_path / 'checkpoint.pth', weights_only=True)
    assert state['model_ema'].keys() == state['model'].keys()
    key = 'mhca_stages.0.mhca_blks.0.MHCA_layers.0.factoratt_crpe.qkv.weight'
    assert not torch.equal(state['model_ema'][key], state['model'][key])
    resumed = run(two_class, tmp_path, '--epochs', '2', '--max-steps', '2', '--model-ema', '--auto-resume')
    assert 'ema_acc1' in resumed


COLOURS = {'apple': (200, 30, 30), 'leaf': (30, 170, 40), 'sky': (40, 80, 220)}


def write_colour_classes(root, train_per_class: int, val_per_class: int, size: int = 64):
    """A user's own ImageFolder: three classes named by the colour of a disc on a dark background."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for name, rgb in COLOURS.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = Image.new('RGB', (size, size), tuple(rng.randint(0, 90) for _ in range(3)))
                r = rng.randint(size // 5, size // 3)
                cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
                colour = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in rgb)
                ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
                image.save(root / split / name / f'{i}.jpg')
    return root


def stand_in_imagenet_checkpoint(path):
    """A 1000-class checkpoint in the released format whose features depend on the input, as pretrained ones
    do: random weights with batch-norm statistics measured on images (at initialisation they are 0 / 1, and
    the evaluated network's pooled features are the same for every image)."""
    torch.manual_seed(0)
    model = timm.create_model('mpvit_tiny')
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the batches
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(16, 3, 64, 64))
    torch.save({'model': model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_finetune_route_learns_your_classes_and_predict_names_them(tmp_path, capsys):
    """The documented route: finetune.yaml from ImageNet weights on a 3-class folder, at small batch and few
    epochs, rises above chance (the ImageNet recipe ran its first epochs at ~1e-6 and stayed at chance); the
    checkpoint carries the classes and transform, so predict.py and --eval use them."""
    data = write_colour_classes(tmp_path / 'fruit', train_per_class=24, val_per_class=8)
    weights = stand_in_imagenet_checkpoint(tmp_path / 'imagenet.pth')
    args = cls_main.parse_args(['-c', str(REPO / 'configs/classification/finetune.yaml'), '--pretrained', str(weights),
                                '--data-path', str(data), '--output-dir', str(tmp_path / 'out'), '--input-size', '64',
                                '--batch-size', '16', '--epochs', '5', '--warmup-steps', '3', '--num-workers', '0',
                                '--amp', 'none'])
    assert args.lr == 2e-4 and args.layer_decay == 0.75  # the config's, used as given (not x batch / 512)
    result = cls_main.main(args)
    assert result['best_acc1'] > 50.0, result  # chance: 33.3
    state = torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)
    cfg = state['pretrained_cfg']
    assert cfg['label_names'] == ['apple', 'leaf', 'sky'] and cfg['num_classes'] == 3
    assert cfg['architecture'] == 'mpvit_tiny' and cfg['input_size'] == [3, 64, 64] and cfg['crop_pct'] == 0.875

    predict = load_script('tools/predict.py')
    image = data / 'val' / 'sky' / '0.jpg'
    top = predict.main([str(image), '--weights', str(tmp_path / 'out' / 'checkpoint.pth'), '--top', '3'])[0]
    assert sorted(entry['name'] for entry in top) == ['apple', 'leaf', 'sky']
    out = capsys.readouterr().out
    assert f"{top[0]['name']} ({top[0]['index']})" in out
    model = timm.create_model('mpvit_tiny', num_classes=3).eval()
    model.load_state_dict(state['model'])
    transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))
    from PIL import Image
    with torch.no_grad():  # predict used the checkpoint's 64-pixel transform, not ImageNet's 224
        expected = model(transform(Image.open(image).convert('RGB')).unsqueeze(0)).softmax(-1)[0]
    assert top[0]['probability'] == pytest.approx(float(expected.max()), rel=1e-4)

    evaluated = run(data, tmp_path / 'eval', '--input-size', '64', '--eval', '--resume',
                    str(tmp_path / 'out' / 'checkpoint.pth'))
    record = json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())
    assert record['acc1'] == evaluated['acc1'] and record['paper_row'] == 'mpvit_tiny'
    assert record['dataset']['name'] == 'fruit' and record['dataset']['split'] == 'val'
    assert record['dataset']['images'] == 24 and record['dataset']['num_classes'] == 3


def test_warm_up_in_steps_and_layer_decay(two_class, tmp_path):
    """--warmup-steps: the lr reaches its peak after that many optimizer steps, inside the first epoch (the
    per-epoch schedule would still be at --warmup-lr); --layer-decay: the classifier at lr, the stem lowest."""
    args = cls_main.parse_args([*SMALL, '--data-path', str(two_class), '--lr', '1e-3', '--warmup-steps', '2',
                                '--layer-decay', '0.5', '--epochs', '10'])
    model = timm.create_model('mpvit_tiny', num_classes=2)
    optimizer = cls_main.build_optimizer(args, model)
    scheduler, epochs = cls_main.build_scheduler(args, optimizer, steps_per_epoch=4)
    scales = sorted({group['lr_scale'] for group in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** 5)
    head = {id(p) for p in model.get_classifier().parameters()}
    assert all(group['lr_scale'] == 1.0 for group in optimizer.param_groups if head & {id(p) for p in group['params']})
    lrs = []
    for step in range(1, 41):
        scheduler.step_update(step)
        lrs.append(cls_main.current_lr(optimizer))
    assert lrs[0] < lrs[1] and lrs[1] == pytest.approx(1e-3, rel=1e-2)  # warm-up over, within epoch 0
    assert lrs[-1] == pytest.approx(args.min_lr, rel=1e-2) and epochs == 10


def test_evaluating_on_other_classes_is_refused(two_class, tmp_path, caplog):
    """A checkpoint of this script names its classes: the same count under other names is refused for --eval
    (its classifier would fit and score the wrong classes), and fine-tuning makes a new classifier."""
    run(two_class, tmp_path / 'a', '--epochs', '1', '--max-steps', '1')
    state = torch.load(tmp_path / 'a' / 'checkpoint.pth', weights_only=True)
    assert state['pretrained_cfg']['label_names'] == ['disc', 'square']
    state['pretrained_cfg']['label_names'] = ['cat', 'dog']
    torch.save(state, tmp_path / 'pets.pth')
    with pytest.raises(CheckpointError, match=r"pets\.pth was trained on 2 classes .*0: 'cat' vs 'disc'"):
        run(two_class, tmp_path / 'eval', '--eval', '--resume', str(tmp_path / 'pets.pth'))
    with caplog.at_level(logging.WARNING):
        run(two_class, tmp_path / 'finetune', '--epochs', '1', '--max-steps', '1', '--pretrained',
            str(tmp_path / 'pets.pth'))
    assert any('cat, dog' in r.getMessage() and 'new classifier' in r.getMessage() for r in caplog.records)


def test_resume_with_another_schedule_is_one_line(two_class, tmp_path):
    """The optimizer groups and schedule come back from the checkpoint: another --layer-decay failed inside
    torch with a traceback, another --warmup-steps / --epochs was silently replaced by the saved schedule."""
    run(two_class, tmp_path, '--epochs', '2', '--run-epochs', '1', '--max-steps', '1', '--warmup-steps', '1')
    for flag, value, message in (('--layer-decay', '0.7', r'--layer-decay None \(now 0\.7\)'),
                                 ('--warmup-steps', '3', r'--warmup-steps 1 \(now 3\)')):
        extra = ['--warmup-steps', '1'] if flag != '--warmup-steps' else []
        with pytest.raises(InvalidInputError, match=rf'checkpoint\.pth was trained with {message}: resume'):
            run(two_class, tmp_path, '--epochs', '2', '--max-steps', '1', '--auto-resume', flag, value, *extra)
    result = run(two_class, tmp_path, '--epochs', '2', '--max-steps', '1', '--warmup-steps', '1', '--auto-resume')
    assert torch.load(tmp_path / 'checkpoint.pth', weights_only=True)['epoch'] == 1 and 'acc1' in result


def test_batch_paths_flag_installs_the_batched_stages():
    """``--batch-paths always`` (a config key too) builds the model with batched stages; by default per-path."""
    from mpvit.models.batched_paths import BatchedMHCAStage
    from mpvit.models.mpvit import MHCAStage

    for flag, kind in (('always', BatchedMHCAStage), ('auto', MHCAStage)):
        model = cls_main.build_model(cls_main.parse_args([*SMALL, '--device', 'cpu', '--batch-paths', flag]), None)
        assert {type(m) for m in model.modules() if isinstance(m, MHCAStage)} == {kind}
