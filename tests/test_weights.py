"""Weights from anywhere: no code runs from a checkpoint on any path, damaged files are refused, safetensors and
the Hub round-trip, and every source is looked up in the weights directory, the Hub, then the URLs."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import threading
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from fidelity import compare, golden, synth_input, synth_state_dict
from helpers import REPO, ForgedArray, hub_cache, load_script, offline_hub, write_tiny_ade

from mpvit import MPViT, model_zoo
from mpvit.checkpoint import read_checkpoint
from mpvit.demo_data import write_shapes_coco, write_shapes_imagefolder
from mpvit.serialization import CheckpointError, tensors_for_safetensors
from mpvit.weights import fetch, file_sha256


class Payload:
    """What a checkpoint from anywhere may hold: unpickling it calls ``os.system``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def _payload_pth(folder: Path, name: str = 'payload.pth', **extra) -> Tuple[Path, Path]:
    marker = folder / f'{name}.ran'
    path = folder / name
    torch.save({'model': {'stem.0.conv.weight': torch.zeros(1)}, 'args': Payload(marker), **extra}, path)
    return path, marker


def _one_line_refusal(proc: subprocess.CompletedProcess, path: Path, what: str = 'posix.system') -> str:
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and str(path) in last and what in last, last
    return last


def _run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600)


def _env(**extra: str) -> Dict[str, str]:
    """This process's environment (the private MPVIT_WEIGHTS included), for a subprocess."""
    return {**os.environ, 'PYTHONWARNINGS': 'ignore', **extra}


# ------------------------------------------------------------------------------------------ no code runs


def test_timm_overlay_refuses_a_payload_before_building(tmp_path, monkeypatch):
    path, marker = _payload_pth(tmp_path)
    built = []
    monkeypatch.setattr(MPViT, '__init__', lambda self, *a, **k: built.append(1) or nn.Module.__init__(self))
    with pytest.raises(CheckpointError, match=r'payload.pth asks to unpickle posix.system: refused.*'
                                              r'convert_checkpoint.py --drop-objects'):
        timm.create_model('mpvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not marker.exists() and not built


def test_mmengine_schemes_all_read_without_code(tmp_path, monkeypatch):
    """torchvision:// (and open-mmlab://, mmcls://) go through mmengine's load_url; s3:// / petrel:// through
    its _safe_torch_load on a stream: both replaced by safe readers when mpvit.mmseg is imported."""
    pytest.importorskip('mmengine')
    import io

    from mmengine.runner.checkpoint import CheckpointLoader

    import mpvit.mmseg  # noqa: F401
    from mpvit.weights import local_names

    monkeypatch.setenv('MPVIT_WEIGHTS', str(tmp_path))
    url = 'https://download.pytorch.org/models/resnet18-f37072fd.pth'
    payload, marker = _payload_pth(tmp_path, name=local_names(url)[0])
    with pytest.raises(CheckpointError, match='asks to unpickle posix.system: refused'):
        CheckpointLoader.load_checkpoint('torchvision://resnet18')
    import mmengine.runner.checkpoint as mmengine_checkpoint

    with pytest.raises(CheckpointError, match='asks to unpickle posix.system: refused'):
        mmengine_checkpoint._safe_torch_load(io.BytesIO(payload.read_bytes()))
    assert not marker.exists()


def test_every_format_refuses_a_payload_and_names_the_global(tmp_path):
    legacy = tmp_path / 'legacy.pth'
    marker = tmp_path / 'ran'
    torch.save({'args': Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    pkl = tmp_path / 'model_final.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}, '__author__': 'x', 'hook': Payload(marker)}, f)
    for path in (legacy, pkl):
        with pytest.raises(CheckpointError, match=rf'{path.name} asks to unpickle posix.system: refused'):
            read_checkpoint(str(path))
    assert not marker.exists()


def test_harmless_training_metadata_loads_without_full_unpickling(tmp_path):
    """DeiT-style ``args`` Namespace, numpy scalars / arrays / dtypes (mmengine, Detectron2 metadata), and the
    Detectron2 model-zoo pickle layout, read by the restricted readers."""
    deit = tmp_path / 'deit.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=5e-4, model='mpvit_tiny'),
                'meta': {'seed': np.int64(3), 'best': np.float32(0.5), 'hist': np.arange(3),
                         'dtype': np.dtype('float16')}}, deit)
    loaded = read_checkpoint(str(deit))
    assert loaded['args'].lr == 5e-4 and loaded['meta']['seed'] == 3 and loaded['meta']['hist'].tolist() == [0, 1, 2]
    numpy_data = tmp_path / 'numpy_data.pth'
    torch.save({'classes': np.array(['cat', 'dog']), 'raw': np.array([b'ab']), 'name': np.str_('x'),
                'big_endian': np.arange(4, dtype='>i4'), 'empty': np.zeros((0, 3)), 'flag': np.array([True])},
               numpy_data)
    loaded = read_checkpoint(str(numpy_data))
    assert loaded['classes'].tolist() == ['cat', 'dog'] and loaded['big_endian'].tolist() == [0, 1, 2, 3]
    assert all(type(loaded[k]) is np.ndarray for k in ('classes', 'raw', 'big_endian', 'empty', 'flag'))
    # Objects and dates are no plain numbers or strings: refused, as an edited object dtype would be.
    for name, value, dtype in (('objects', np.array([1, 'a'], dtype=object), 'O8'),
                               ('when', np.datetime64('2022-06-01'), 'M8')):
        torch.save({name: value}, tmp_path / f'{name}.pth')
        with pytest.raises(CheckpointError, match=f"{name}.pth holds a numpy dtype '{dtype}': refused"):
            read_checkpoint(str(tmp_path / f'{name}.pth'))
    pkl = tmp_path / 'zoo.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': {'w': np.ones((2, 2), np.float32)}, '__author__': 'Detectron2 Model Zoo'}, f, protocol=2)
    assert read_checkpoint(str(pkl))['model']['w'].sum() == 4
    # getattr is not allowlisted as such: only to name a method of an allowlisted record class.
    sneaky = tmp_path / 'getattr.pth'

    class Sneaky:
        def __reduce__(self):
            return getattr, (argparse.Namespace, '__init__')

    torch.save({'x': Sneaky()}, sneaky)
    with pytest.raises(CheckpointError, match='refused'):
        read_checkpoint(str(sneaky))


def _flip_tensor_bytes(path: Path, count: int = 256) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor of a zip-format checkpoint."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - count // 2
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(count))
        f.seek(start)
        f.write(data)


def test_a_checkpoint_repacked_by_a_zip_tool_still_loads(tmp_path):
    """Deflated members cannot be memory-mapped: the early check then reads the file as the load does."""
    plain = tmp_path / 'plain.pth'
    torch.save({'model': {'w': torch.arange(4096.)}}, plain)
    repacked = tmp_path / 'repacked.pth'
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(repacked, 'w', zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    assert torch.equal(read_checkpoint(str(repacked))['model']['w'], torch.arange(4096.))


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'model': timm.create_model('mpvit_tiny').state_dict()}, path)
    _flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match=r'weights.pth is corrupted: the bytes of .*data/\d+ do not match'):
        read_checkpoint(str(path))
    safetensors = tmp_path / 'weights.safetensors'
    from safetensors.torch import save_file

    save_file({'w': torch.ones(1000)}, safetensors)
    safetensors.write_bytes(safetensors.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match='weights.safetensors is not a readable safetensors file'):
        read_checkpoint(str(safetensors))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return write_shapes_imagefolder(tmp_path_factory.mktemp('images'), num_classes=2, train_per_class=2,
                                    val_per_class=1, size=48)


def test_classification_eval_of_a_corrupted_checkpoint_is_one_line(images, tmp_path):
    """It used to print an Acc@1 with loss NaN and exit 0."""
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': timm.create_model('mpvit_tiny', num_classes=2).state_dict()}, path)
    _flip_tensor_bytes(path)
    proc = _run('classification/main.py', '--model', 'mpvit_tiny', '--eval', '--resume', str(path),
                '--data-path', str(images), '--output-dir', str(tmp_path / 'out'), '--input-size', '48',
                '--num-workers', '0')
    last = _one_line_refusal(proc, path, 'is corrupted')
    assert not (tmp_path / 'out' / 'eval_metrics.json').exists(), last


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp('coco'), train_images=2, val_images=1, size=(96, 80))


def _d2(coco: Path, out: Path, *opts: str, flags: Tuple[str, ...] = ()) -> List[str]:
    return ['detectron2/train_net.py', '--config-file', 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml',
            '--coco-dataset', 'shapes_train', str(coco / 'annotations/instances_train.json'), str(coco / 'train'),
            '--coco-dataset', 'shapes_val', str(coco / 'annotations/instances_val.json'), str(coco / 'val'), *flags,
            'MODEL.DEVICE', 'cpu', 'OUTPUT_DIR', str(out), 'DATASETS.TRAIN', "('shapes_train',)",
            'DATASETS.TEST', "('shapes_val',)", 'MODEL.RETINANET.NUM_CLASSES', '4', 'DATALOADER.NUM_WORKERS', '0',
            'INPUT.MIN_SIZE_TEST', '96', 'INPUT.MAX_SIZE_TEST', '128', 'SOLVER.MAX_ITER', '1', *opts]


def _seg(tool: str, ade: Path, work: Path, *extra: str) -> List[str]:
    config = 'configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py'
    return [f'semantic_segmentation/tools/{tool}.py', config, *extra, '--work-dir', str(work), '--cfg-options',
            f'data_root={ade}',
            f'train_dataloader.dataset.data_root={ade}', f'test_dataloader.dataset.data_root={ade}',
            f'val_dataloader.dataset.data_root={ade}']


def _detr(coco: Path, out: Path, *extra: str) -> List[str]:
    return ['deformable_detr/main.py', '--backbone', 'mpvit_tiny', '--coco-path', str(coco), '--train-set', 'train',
            '--val-set', 'val', '--output-dir', str(out), '--num-workers', '0', *extra]


def _cls(images: Path, out: Path, *extra: str) -> List[str]:
    return ['classification/main.py', '--model', 'mpvit_tiny', '--data-path', str(images), '--output-dir', str(out),
            '--input-size', '48', '--num-workers', '0', *extra]


def _plant(path: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
    return target


# Each: (name, argv builder (payload .pth, payload .pkl, tmp, data) -> (argv, the file that must be named)).
PAYLOAD_PATHS = {
    'classification --eval --resume': lambda p, k, t, d: (_cls(d['images'], t / 'o', '--eval', '--resume', str(p)), p),
    'classification --pretrained': lambda p, k, t, d: (_cls(d['images'], t / 'o', '--pretrained', str(p)), p),
    'classification --auto-resume': lambda p, k, t, d: (
        _cls(d['images'], t / 'o', '--auto-resume'), _plant(p, t / 'o' / 'checkpoint.pth')),
    'predict.py --weights': lambda p, k, t, d: (
        ['tools/predict.py', str(next(f for f in (d['images'] / 'val').rglob('*') if f.is_file())), '--model',
         'mpvit_tiny',
         '--weights', str(p)], p),
    'detectron2 MODEL.WEIGHTS .pth': lambda p, k, t, d: (_d2(d['coco'], t / 'o', 'MODEL.WEIGHTS', str(p),
                                                             flags=('--eval-only',)), p),
    'detectron2 MODEL.WEIGHTS .pkl': lambda p, k, t, d: (_d2(d['coco'], t / 'o', 'MODEL.WEIGHTS', str(k)), k),
    'detectron2 --resume': lambda p, k, t, d: (
        _d2(d['coco'], t / 'o', 'MODEL.WEIGHTS', '', flags=('--resume',)),
        _plant(p, t / 'o' / 'model_0000009.pth') if (t / 'o').mkdir() or
        (t / 'o' / 'last_checkpoint').write_text('model_0000009.pth') else None),
    'detectron2/demo.py MODEL.WEIGHTS': lambda p, k, t, d: (
        ['detectron2/demo.py', '--config-file', 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml', '--input',
         str(next((d['coco'] / 'val').iterdir())), '--output', str(t / 'vis'), 'MODEL.WEIGHTS', str(p)], p),
    'mmseg test.py': lambda p, k, t, d: (_seg('test', d['ade'], t / 'w', str(p)), p),
    'mmseg init_cfg Pretrained': lambda p, k, t, d: (
        _seg('train', d['ade'], t / 'w') + [f'model.backbone.init_cfg.checkpoint={p}'], p),
    'mmseg load_from': lambda p, k, t, d: (
        _seg('train', d['ade'], t / 'w') + ['model.backbone.init_cfg.checkpoint=', f'load_from={p}'], p),
    'mmseg --resume': lambda p, k, t, d: (
        _seg('train', d['ade'], t / 'w', '--resume') + ['model.backbone.init_cfg.checkpoint='],
        _plant(p, t / 'w' / 'iter_8.pth') if (t / 'w').mkdir() or
        (t / 'w' / 'last_checkpoint').write_text(str(t / 'w' / 'iter_8.pth')) else None),
    'deformable_detr --eval --resume': lambda p, k, t, d: (_detr(d['coco'], t / 'o', '--eval', '--resume', str(p)), p),
    'deformable_detr --pretrained': lambda p, k, t, d: (_detr(d['coco'], t / 'o', '--pretrained', str(p)), p),
    'deformable_detr --auto-resume': lambda p, k, t, d: (
        _detr(d['coco'], t / 'o', '--auto-resume'), _plant(p, t / 'o' / 'checkpoint.pth')),
    'deformable_detr/demo.py --weights': lambda p, k, t, d: (
        ['deformable_detr/demo.py', str(next((d['coco'] / 'val').iterdir())), '--weights', str(p), '-c',
         'configs/deformable_detr/mpvit_tiny.yaml', '--output', str(t / 'vis')], p),
    'convert_deformable_detr.py': lambda p, k, t, d: (['tools/convert_deformable_detr.py', str(p), str(t / 'c.pth')],
                                                      p),
    'convert_checkpoint.py': lambda p, k, t, d: (
        ['tools/convert_checkpoint.py', str(p), str(t / 'c.safetensors')], p),
    'convert_checkpoint.py --drop-objects': lambda p, k, t, d: (
        ['tools/convert_checkpoint.py', '--drop-objects', str(p), str(t / 'c.safetensors')], p),
    'convert_checkpoint.py --drop-objects .pkl': lambda p, k, t, d: (
        ['tools/convert_checkpoint.py', '--drop-objects', str(k), str(t / 'c.safetensors')], k),
    'export_hub.py': lambda p, k, t, d: (['tools/export_hub.py', 'mpvit_tiny', '--weights', str(p), '--out',
                                          str(t / 'hub')], p),
}


@pytest.fixture(scope='module')
def data(images, coco, tmp_path_factory):
    return dict(images=images, coco=coco, ade=write_tiny_ade(tmp_path_factory.mktemp('ade')))


@pytest.mark.slow
@pytest.mark.parametrize('case', list(PAYLOAD_PATHS))
def test_no_loading_path_runs_a_checkpoints_code(case, data, tmp_path):
    payload, marker = _payload_pth(tmp_path)
    pkl = tmp_path / 'payload.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}, '__author__': 'x', 'hook': Payload(marker)}, f)
    argv, named = PAYLOAD_PATHS[case](payload, pkl, tmp_path, data)
    proc = _run(*argv)
    assert not marker.exists(), f'{case}: the payload ran'
    _one_line_refusal(proc, named)


# The paths of PAYLOAD_PATHS that read numpy data (class names, metadata, Detectron2 pickles) or re-export files.
FORGED_DTYPE_PATHS = ('classification --eval --resume', 'predict.py --weights', 'detectron2 MODEL.WEIGHTS .pkl',
                      'mmseg load_from', 'deformable_detr --eval --resume', 'deformable_detr/demo.py --weights',
                      'convert_checkpoint.py --drop-objects', 'export_hub.py')


@pytest.mark.slow
@pytest.mark.parametrize('case', FORGED_DTYPE_PATHS)
def test_no_loading_path_builds_numpy_data_of_a_forged_dtype(case, data, tmp_path):
    """Beside weights that are never touched it used to load as if clean; where touched, a segmentation fault."""
    forged = tmp_path / 'forged.pth'
    torch.save({'model': {'stem.0.conv.weight': torch.zeros(1)}, 'meta': {'classes': ForgedArray()}}, forged)
    pkl = tmp_path / 'forged.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}, '__author__': 'x', 'names': ForgedArray()}, f, protocol=2)
    argv, named = PAYLOAD_PATHS[case](forged, pkl, tmp_path, data)
    proc = _run(*argv)
    assert proc.returncode > 0, f'{case}: rc {proc.returncode}\n{proc.stderr[-2000:]}'  # < 0: killed by a signal
    _one_line_refusal(proc, named, "holds a numpy dtype 'O8': refused")
    assert not list(tmp_path.glob('c.*')) and not (tmp_path / 'hub').exists(), f'{case} wrote a file'


# ------------------------------------------------------------------------------------------ framework writers


def test_detectron2_checkpointer_and_mmengine_message_hub_load(tmp_path):
    """What Detectron2's checkpointer writes, and mmengine's MessageHub state (HistoryBuffers) in a checkpoint.
    The drivers' own checkpoints (and mmengine Runner's) are read back by their resume tests
    (test_classification, test_deformable_detr, test_detectron2, test_mmseg), through the same reader."""
    pytest.importorskip('detectron2')
    pytest.importorskip('mmengine')
    from detectron2.checkpoint import DetectionCheckpointer
    from mmengine.logging import MessageHub

    import mpvit.mmseg  # noqa: F401  (mmengine reads through our loader)

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer).save('model_0000001', iteration=1)
    assert read_checkpoint(str(tmp_path / 'model_0000001.pth'))['iteration'] == 1
    hub = MessageHub.get_instance('weights_test')
    hub.update_scalar('train/loss', np.float32(0.5))
    torch.save({'meta': {'seed': np.int64(1), 'dataset_meta': {'classes': ('a', 'b')}},
                'message_hub': hub.state_dict(), 'state_dict': model.state_dict()}, tmp_path / 'iter_1.pth')
    loaded = read_checkpoint(str(tmp_path / 'iter_1.pth'))
    assert loaded['message_hub']['log_scalars']['train/loss'].current() == 0.5


# ------------------------------------------------------------------------------------------ converter


class SubprocessPayload:
    """A payload outside the modules torch always blocks: unpickling it calls ``subprocess.call``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.call, (['touch', self.marker],)


@pytest.mark.parametrize('suffix', ['.pth', '.pkl'])
def test_converter_drops_other_objects_without_running_them_and_keeps_the_weights(tmp_path, suffix):
    model = timm.create_model('mpvit_tiny').eval()
    path, marker = tmp_path / f'run{suffix}', tmp_path / 'payload.ran'
    checkpoint = {'model': model.state_dict(), 'meta': {'when': datetime.date(2022, 6, 1)},
                  'hook': SubprocessPayload(marker)}
    if suffix == '.pth':
        torch.save(checkpoint, path)
    else:  # a Detectron2-style pickle of numpy arrays
        with open(path, 'wb') as f:
            pickle.dump({**checkpoint, 'model': {k: v.numpy() for k, v in checkpoint['model'].items()}}, f)
    refused = _run('tools/convert_checkpoint.py', str(path), str(tmp_path / 'run.safetensors'))
    _one_line_refusal(refused, path, 'datetime.date')
    converted = _run('tools/convert_checkpoint.py', '--drop-objects', str(path), str(tmp_path / 'run.safetensors'))
    assert converted.returncode == 0, converted.stderr[-2000:]
    assert not marker.exists(), 'the payload ran'
    # The call is named as the file spells it (pickle protocol 2 writes subprocess.call as commands.call).
    assert re.search(r'left out objects of 2 types: .*datetime\.date', converted.stdout)
    assert re.search(r'left out objects of 2 types: .*(subprocess|commands)\.call', converted.stdout)
    assert f'sha256 {file_sha256(path)}' in converted.stdout
    again = timm.create_model('mpvit_tiny', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'run.safetensors'))).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(again(x), model(x))


def test_tensors_for_safetensors_copies_shared_memory():
    base = torch.arange(6.)
    out = tensors_for_safetensors({'a': base, 'b': base, 'c': base.view(2, 3).t(), 'n': np.ones(2)})
    pointers = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(pointers) == 4 and all(t.is_contiguous() for t in out.values())
    assert torch.equal(out['c'], base.view(2, 3).t())


# ------------------------------------------------------------------------------------------ safetensors, Hub


def test_model_state_dict_keeps_the_aliases_without_shared_memory():
    model = timm.create_model('mpvit_tiny')
    state = model.state_dict()
    assert 'mhca_stages.0.mhca_blks.0.MHCA_layers.0.cpe.proj.weight' in state
    assert set(state) == set(golden('manifest_mpvit_tiny.json')['tensors'])
    pointers = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
    assert len(pointers) == len(set(pointers))
    # keep_vars: the parameters themselves (shared, as registered)
    kept = model.state_dict(keep_vars=True)
    assert kept['mhca_stages.0.mhca_blks.0.MHCA_layers.0.cpe.proj.weight'] is \
        model.mhca_stages[0].mhca_blks[0].cpe.proj.weight


def test_state_dict_round_trip_with_alias_copies_loads_what_was_changed():
    """Changing only the parameters of a ``state_dict()`` (the alias copies left as handed out) loads the
    change, as it did when the aliases shared memory; changed aliases and files keep the reference's
    last-alias-wins order."""
    model = timm.create_model('mpvit_tiny')
    state = model.state_dict()
    for name, param in model.named_parameters():
        state[name] = torch.randn_like(param)
    model.load_state_dict(state)
    assert all(torch.equal(param, state[name]) for name, param in model.named_parameters())
    encoder = model.mhca_stages[1].mhca_blks[0]
    state = model.state_dict()
    last = 'mhca_stages.1.mhca_blks.0.MHCA_layers.1.factoratt_crpe.crpe.conv_list.0.weight'
    state[last] = state[last] + 1  # a changed alias: the last one written wins
    model.load_state_dict(state)
    assert torch.equal(encoder.crpe.conv_list[0].weight, state[last])
    state = model.state_dict()
    state[last].data.mul_(0)  # an edit that bypasses the version counter is a change too
    model.load_state_dict(state)
    assert not encoder.crpe.conv_list[0].weight.any()
    with torch.inference_mode():  # saving inside an evaluation block
        assert len(model.state_dict()) == len(state)


def test_golden_case_survives_timm_safetensors_export_and_hub_load(tmp_path):
    """Synthetic weights in the released layout -> save_for_hf(safe_serialization=True) -> hf-hub: load
    (offline, from a Hub cache) -> the reference's golden logits and stage outputs."""
    case = golden('cls_mpvit_tiny_224x224.json')
    model = timm.create_model('mpvit_tiny').eval()
    model.load_state_dict(synth_state_dict(golden('manifest_mpvit_tiny.json')['tensors']))
    timm.models.save_for_hf(model, tmp_path / 'export', safe_serialization=True)
    cache = hub_cache(tmp_path / 'hub', 'someone/mpvit_tiny.test', tmp_path / 'export')
    code = f"""
import json, sys, torch, timm
sys.path.insert(0, {str(REPO / 'tests')!r})
from fidelity import compare, golden, synth_input
import mpvit
case = golden('cls_mpvit_tiny_224x224.json')
model = timm.create_model('hf-hub:someone/mpvit_tiny.test', pretrained=True).eval()
x = synth_input(**case['input'])
with torch.no_grad():
    logits, stages = model(x), model.forward_intermediates(x, intermediates_only=True)
problems = compare(case['logits'], logits)
for summary, stage in zip(case['stages'], stages):
    problems += compare(summary, stage)
print(json.dumps(dict(problems=problems, file=model.pretrained_cfg['file'])))
"""
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          env=_env(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['problems'] == [] and result['file'].endswith('model.safetensors')
    # The same check fails for weights that differ from the golden ones.
    with torch.no_grad():
        assert compare(case['logits'], timm.create_model('mpvit_tiny').eval()(synth_input(**case['input']))) != []


def test_push_to_hf_hub_local_part_writes_our_license_and_citation(tmp_path):
    from timm.models._hub import generate_readme

    model = timm.create_model('mpvit_tiny').eval()
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / 'config.json').read_text())['pretrained_cfg']['license'] == 'other'
    readme = generate_readme(model_zoo.model_card('mpvit_tiny'), 'someone/mpvit_tiny')
    assert 'license: other' in readme and 'lee2022mpvit' in readme and '78.2' in readme


def test_transformers_timm_wrapper_saves_safetensors_that_timm_loads(tmp_path):
    transformers = pytest.importorskip('transformers')
    import mpvit  # noqa: F401

    wrapper = transformers.TimmWrapperForImageClassification(
        transformers.TimmWrapperConfig(architecture='mpvit_tiny', num_labels=3)).eval()
    wrapper.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    reference = wrapper(pixel_values=x).logits
    model = timm.create_model('mpvit_tiny', num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'model.safetensors'))).eval()
    assert torch.equal(model(x), reference)
    back = transformers.TimmWrapperForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(back(pixel_values=x).logits, reference)


def _released_file(folder: Path, name: str, manifest: str, wrap: str = 'model') -> Path:
    path = folder / Path(model_zoo.get(name).url).name
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({wrap: synth_state_dict(golden(manifest)['tensors'])}, path)
    return path


def test_export_hub_classification_row_loads_from_a_hub_cache(tmp_path, monkeypatch):
    weights = tmp_path / 'weights'
    monkeypatch.setenv('MPVIT_WEIGHTS', str(weights))
    source = _released_file(weights, 'mpvit_tiny', 'manifest_mpvit_tiny.json')
    export = load_script('tools/export_hub.py')
    out = export.main(['mpvit_tiny', '--weights', 'released', '--out', str(tmp_path / 'hub'), '--hub-id',
                       'someone/mpvit_tiny.in1k'])
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    card = (out / 'README.md').read_text()
    assert 'license: other' in card and 'license_name: mpvit-lsa' in card and 'lee2022mpvit' in card
    assert '  - ImageNet-1k top-1 (%): 78.2' in card and file_sha256(source) in card
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'mpvit_tiny' and len(config['label_names']) == 1000
    # released via the Hub: the weights directory lacks the file, model_zoo.json names the Hub repository.
    cache = hub_cache(tmp_path / 'cache', 'someone/mpvit_tiny.in1k', out)
    offline_hub(monkeypatch, cache)
    monkeypatch.setenv('MPVIT_WEIGHTS', str(tmp_path / 'empty'))
    patched = [model_zoo.ZooEntry(**{**e.__dict__, 'hf_hub_id': 'someone/mpvit_tiny.in1k'})
               if e.name == 'mpvit_tiny' else e for e in model_zoo.entries()]
    monkeypatch.setattr(model_zoo, 'entries', lambda: patched)
    from_hub = timm.create_model('mpvit_tiny', pretrained=True).eval()
    assert from_hub.pretrained_cfg['file'].startswith(str(cache))
    from_file = timm.create_model('mpvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(source))).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(from_hub(x), from_file(x))


@pytest.mark.slow
def test_export_hub_detector_row_serves_released_from_the_hub(tmp_path, monkeypatch):
    pytest.importorskip('detectron2')
    from detectron2.modeling import build_model

    from mpvit.d2 import MPViTCheckpointer

    source = _released_file(tmp_path / 'files', 'retinanet_mpvit_tiny_1x', 'manifest_d2_retinanet_mpvit_tiny.json')
    out = load_script('tools/export_hub.py').main(
        ['retinanet_mpvit_tiny_1x', '--weights', str(source), '--out', str(tmp_path / 'hub')])
    assert {'model.safetensors', 'config.json', 'README.md', 'retinanet_mpvit_tiny_1x.safetensors'} == \
        {p.name for p in out.iterdir()}
    cache = hub_cache(tmp_path / 'cache', 'someone/retinanet_mpvit_tiny_1x', out)
    offline_hub(monkeypatch, cache)
    entry = model_zoo.get('retinanet_mpvit_tiny_1x')
    patched = [model_zoo.ZooEntry(**{**e.__dict__, 'hf_hub_id': 'someone/retinanet_mpvit_tiny_1x'})
               if e.name == entry.name else e for e in model_zoo.entries()]
    monkeypatch.setattr(model_zoo, 'entries', lambda: patched)
    found = fetch(model_zoo.resolve('released', REPO / entry.config))
    assert found.startswith(str(cache)) and found.endswith('retinanet_mpvit_tiny_1x.safetensors')
    from detectron2.config import get_cfg

    from mpvit.d2 import add_mpvit_config

    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(REPO / entry.config))
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.MPVIT.NORM', 'BN'])
    from_hub, from_file = build_model(cfg).eval(), build_model(cfg).eval()
    MPViTCheckpointer(from_hub, heads_must_fit=True).load(found)
    MPViTCheckpointer(from_file, heads_must_fit=True).load(str(source))
    hub_state, file_state = from_hub.state_dict(), from_file.state_dict()
    assert all(torch.equal(hub_state[k], file_state[k]) for k in file_state)


# ------------------------------------------------------------------------------------------ weights directory


class _Server:
    """Files over HTTP on 127.0.0.1, counting requests; ``short`` names files sent shorter than announced."""

    def __init__(self, files: Dict[str, bytes], short: Tuple[str, ...] = ()):
        self.files, self.short, self.requests = files, short, []

    @contextmanager
    def running(self) -> Iterator[str]:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                name = self.path.lstrip('/')
                server_self.requests.append(name)
                if name not in server_self.files:
                    self.send_error(404)
                    return
                body = server_self.files[name]
                self.send_response(200)
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if name in server_self.short else body)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f'http://127.0.0.1:{server.server_address[1]}'
        finally:
            server.shutdown()
            server.server_close()


def _zoo_entry(monkeypatch, name: str, **fields) -> model_zoo.ZooEntry:
    patched = [model_zoo.ZooEntry(**{**e.__dict__, **fields}) if e.name == name else e for e in model_zoo.entries()]
    monkeypatch.setattr(model_zoo, 'entries', lambda: patched)
    return model_zoo.get(name)


def test_downloads_are_atomic_checked_hashed_and_looked_up_first_locally(tmp_path, monkeypatch, capfd):
    weights = tmp_path / 'weights'
    monkeypatch.setenv('MPVIT_WEIGHTS', str(weights))
    good = tmp_path / 'good.pth'
    torch.save({'model': {'w': torch.ones(3)}}, good)
    body = good.read_bytes()
    other = tmp_path / 'other.pth'
    torch.save({'model': {'w': torch.zeros(3)}}, other)
    server = _Server({'a/model_final.pth': body, 'b/model_final.pth': other.read_bytes(), 'short.pth': body,
                      'page.pth': b'<html>Sign in to download</html>', 'mirror/mpvit_tiny.pth': body},
                     short=('short.pth',))
    with server.running() as base:
        # An arbitrary URL: downloaded into the weights directory, its sha256 printed; then found there.
        # Two URLs ending in the same name are two files.
        path = fetch(f'{base}/a/model_final.pth')
        assert Path(path).parent == weights and Path(path).name.endswith('-model_final.pth')
        assert Path(path).read_bytes() == body and f'sha256 {file_sha256(good)}' in capfd.readouterr().err
        assert fetch(f'{base}/a/model_final.pth') == path and server.requests == ['a/model_final.pth']
        assert Path(fetch(f'{base}/b/model_final.pth')).read_bytes() == other.read_bytes()
        # A short read, or a web page in place of the file, is refused; nothing is left behind.
        with pytest.raises(CheckpointError, match=r'short.pth: the download stopped after [\d,]+ of [\d,]+ bytes'):
            fetch(f'{base}/short.pth')
        with pytest.raises(CheckpointError, match=r'page.pth: the download is no usable checkpoint'):
            fetch(f'{base}/page.pth')
        assert len([p for p in weights.iterdir() if p.name != '.locks']) == 2
        # A released row: the recorded sha256 is checked (a wrong copy is refused, kept nowhere); a mirror
        # serves when the authors' link is dead.
        _zoo_entry(monkeypatch, 'mpvit_tiny', url=f'{base}/dead/mpvit_tiny.pth',
                   mirrors=[f'{base}/mirror/mpvit_tiny.pth'], sha256='0' * 64)
        with pytest.raises(CheckpointError) as info:
            fetch(f'{base}/dead/mpvit_tiny.pth')
        message = str(info.value)
        assert 'HTTP Error 404' in message and f'sha256 {file_sha256(good)}' in message and '\n' not in message
        assert not (weights / 'mpvit_tiny.pth').exists()
        _zoo_entry(monkeypatch, 'mpvit_tiny', url=f'{base}/dead/mpvit_tiny.pth',
                   mirrors=[f'{base}/mirror/mpvit_tiny.pth'], sha256=file_sha256(good))
        assert fetch(f'{base}/dead/mpvit_tiny.pth') == str(weights / 'mpvit_tiny.pth')
        # A damaged local copy, or one of another sha256, is named and passed over: the next source replaces it.
        for bad in (body[:100], other.read_bytes()):
            (weights / 'mpvit_tiny.pth').write_bytes(bad)
            assert fetch(f'{base}/dead/mpvit_tiny.pth') == str(weights / 'mpvit_tiny.pth')
            assert (weights / 'mpvit_tiny.pth').read_bytes() == body
        # A URL urllib cannot send is one more place that failed, not a traceback.
        with pytest.raises(CheckpointError, match='cannot find the weights'):
            fetch(f'{base}/caf\u00e9 weights/x.pth')


def test_released_is_found_in_the_weights_directory_by_its_released_name(tmp_path, monkeypatch):
    monkeypatch.setenv('MPVIT_WEIGHTS', str(tmp_path))
    entry = model_zoo.get('mpvit_xsmall')
    torch.save({'model': {}}, tmp_path / 'mpvit_xsmall.pth')
    assert fetch(model_zoo.resolve('released', model='mpvit_xsmall')) == str(tmp_path / 'mpvit_xsmall.pth')
    (tmp_path / 'mpvit_xsmall.pth').unlink()
    from safetensors.torch import save_file

    save_file({'w': torch.ones(1)}, tmp_path / 'mpvit_xsmall.safetensors')
    assert fetch(entry.url) == str(tmp_path / 'mpvit_xsmall.safetensors')
    # A recorded sha256 that the local copy does not have: passed over and named (the URL is offline here).
    (tmp_path / 'mpvit_xsmall.safetensors').unlink()
    _zoo_entry(monkeypatch, 'mpvit_xsmall', sha256='1' * 64)
    torch.save({'model': {}}, tmp_path / 'mpvit_xsmall.pth')
    with pytest.raises(CheckpointError, match='mpvit_xsmall.pth .the released mpvit_xsmall. has sha256'):
        fetch(entry.url)


def test_offline_error_names_the_directory_the_hub_and_the_url(tmp_path, monkeypatch):
    monkeypatch.setenv('MPVIT_WEIGHTS', str(tmp_path))
    offline_hub(monkeypatch, tmp_path / 'hub')
    with _Server({}).running() as base:
        entry = _zoo_entry(monkeypatch, 'upernet_mpvit_small', url=f'{base}/upernet_mpvit_small.pth',
                           hf_hub_id='someone/upernet_mpvit_small')
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(entry.url)
    message = str(info.value)
    assert '\n' not in message
    for place in (f'{tmp_path} ($MPVIT_WEIGHTS) for upernet_mpvit_small.pth or upernet_mpvit_small.safetensors',
                  'Hugging Face Hub someone/upernet_mpvit_small/upernet_mpvit_small.safetensors',
                  f'{entry.url}: HTTP Error 404'):
        assert place in message, message


@pytest.mark.slow
def test_detectron2_downloads_a_url_once(coco, tmp_path, monkeypatch):
    """train_net.py used to download MODEL.WEIGHTS into torch's cache, then fvcore's checkpointer again."""
    pytest.importorskip('detectron2')
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from mpvit.d2 import add_mpvit_config

    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(REPO / 'configs/detectron2/retinanet_mpvit_tiny_1x.yaml'))
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.MPVIT.NORM', 'BN', 'MODEL.RETINANET.NUM_CLASSES', '4'])
    source = tmp_path / 'detector.pth'
    torch.save({'model': build_model(cfg).state_dict()}, source)
    server = _Server({'my_detector.pth': source.read_bytes()})
    with server.running() as base:
        proc = _run(*_d2(coco, tmp_path / 'out', 'MODEL.WEIGHTS', f'{base}/my_detector.pth', 'MODEL.MPVIT.NORM', 'BN',
                         flags=('--eval-only',)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.requests == ['my_detector.pth'] and 'AP' in proc.stdout + proc.stderr
    from mpvit.weights import local_names

    assert (Path(os.environ['MPVIT_WEIGHTS']) / local_names(f'{base}/my_detector.pth')[0]).is_file()
