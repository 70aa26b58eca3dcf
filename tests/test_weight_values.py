"""A checkpoint holds numbers and plain metadata only: numpy data of any other or an edited dtype is refused
wherever it sits, by every reader, before a byte becomes an array; and weights that load are usable weights
(finite, floating where the model is, with data) on every loading path."""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import subprocess
import sys
import zipfile
from typing import Callable, Dict

import numpy as np
import pytest
import timm
import torch
from helpers import REPO, ForgedArray, ForgedDtype, load_script

from mpvit.checkpoint import CheckpointError, load_backbone_weights


class _Reduce:
    """Pickles as ``func(*args)`` followed by ``state``, whatever ``func`` is: how a crafted file is written."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, args, state

    def __reduce__(self):
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _edited_dtype(spec: str, state: tuple) -> _Reduce:
    return _Reduce(np.dtype, (spec, False, True), state)


_multiarray = (np._core if hasattr(np, '_core') else np.core).multiarray
FORGERIES: Dict[str, Callable[[], object]] = {
    'object dtype, flags cleared': lambda: ForgedArray(),
    'object array': lambda: np.array([1, 'a'], dtype=object),
    'structured array': lambda: np.zeros(2, dtype=[('a', '<f4'), ('b', '<i4')]),
    'float dtype with an edited item size': lambda: ForgedArray(
        _edited_dtype('f8', (3, '<', None, None, None, 16, 8, 0)), b'A' * 32),
    'void dtype with an object sub-array': lambda: ForgedArray(
        _edited_dtype('V16', (3, '|', (ForgedDtype(), (2,)), None, None, 16, 8, 0))),
    'float dtype with object flags': lambda: ForgedArray(_edited_dtype('f8', (3, '<', None, None, None, -1, -1, 63))),
    'scalar of a forged dtype': lambda: _Reduce(_multiarray.scalar, (ForgedDtype(), b'A' * 8)),
    'numpy.ndarray called directly': lambda: _Reduce(np.ndarray, ((2,), 'O')),
    'array from a list of objects': lambda: ForgedArray(_edited_dtype('f8', (3, '<', None, None, None, -1, -1, 0)),
                                                        [1.0, 2.0]),
    'shape whose element count wraps around': lambda: _Reduce(
        _multiarray._reconstruct, (np.ndarray, (0,), b'b'), (1, (2 ** 32, 2 ** 32), np.dtype('f8'), False, b'')),
    'dimension past 64 bits': lambda: _Reduce(
        _multiarray._reconstruct, (np.ndarray, (0,), b'b'), (1, (2 ** 64,), np.dtype('S0'), False, b'')),
}


def _weights() -> Dict[str, torch.Tensor]:
    return {'stem.0.conv.weight': torch.zeros(2, 3, 3, 3), 'cls_head.cls.bias': torch.zeros(2)}


PLACES: Dict[str, Callable[[object], object]] = {
    'in the weights': lambda forged: {'model': {**_weights(), 'extra': forged}},
    'beside the weights': lambda forged: {'model': _weights(), 'rng': {'numpy': forged}},
    'as class names': lambda forged: {'model': _weights(), 'pretrained_cfg': {'label_names': forged},
                                      'dataset_meta': {'classes': [forged]}},
}

# Reads every file with each reader in a process of its own: a forged array that reached numpy could end it
# with a signal; each refusal must be one CheckpointError line naming the file.
_READ_ALL = '''
import io, json, sys
from mpvit.serialization import CheckpointError, ensure_checkpoint_file, load_dropping_objects, safe_load, \\
    safe_load_stream
results = []
for path in json.load(open(sys.argv[1])):
    readers = [('safe_load', safe_load), ('ensure_checkpoint_file', ensure_checkpoint_file),
               ('load_dropping_objects', load_dropping_objects)]
    if path.endswith('.pth'):
        readers.append(('safe_load_stream', lambda p: safe_load_stream(io.BytesIO(open(p, 'rb').read()), p)))
    for name, read in readers:
        try:
            read(path)
            results.append([path, name, None])
        except CheckpointError as e:
            results.append([path, name, str(e)])
json.dump(results, open(sys.argv[2], 'w'))
'''


def test_forged_numpy_data_is_refused_wherever_it_sits_by_every_reader(tmp_path):
    files = {}  # path -> what it holds where
    for i, (forgery, make) in enumerate(FORGERIES.items()):
        for j, (place, wrap) in enumerate(PLACES.items()):
            path = tmp_path / f'f{i}_{j}.pth'
            torch.save(wrap(make()), path)
            files[str(path)] = f'{forgery}, {place}'
        pkl = tmp_path / f'f{i}.pkl'
        with open(pkl, 'wb') as f:
            pickle.dump({'model': {'w': np.zeros(2, np.float32)}, '__author__': 'x', 'names': make()}, f, protocol=2)
        files[str(pkl)] = f'{forgery}, in a Detectron2 .pkl'
    (tmp_path / 'files.json').write_text(json.dumps(list(files)))
    proc = subprocess.run([sys.executable, '-c', _READ_ALL, str(tmp_path / 'files.json'), str(tmp_path / 'out.json')],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, f'rc {proc.returncode} (negative: a signal)\n{proc.stderr[-3000:]}'
    results = json.loads((tmp_path / 'out.json').read_text())
    assert len(results) == len(FORGERIES) * (len(PLACES) * 4 + 3)
    for path, reader, message in results:
        assert message is not None, f'{reader} loaded {files[path]}'
        assert '\n' not in message and message.startswith(path) and 'refused' in message, (files[path], message)
        assert 'numpy' in message or 'asks to unpickle' in message, (files[path], reader, message)


def _refilled_array_checkpoint(path, size: int) -> None:
    """A zip checkpoint whose pickle fills an array, has torch's own allowlisted rebuild make a tensor of its
    memory, then fills the array again: numpy frees the first memory, which the tensor still reads."""
    def global_(module: str, name: str) -> bytes:
        return b'c' + f'{module}\n{name}\n'.encode()

    def text(data: bytes) -> bytes:
        return b'X' + len(data).to_bytes(4, 'little') + data

    state = pickletools.optimize(pickle.dumps(np.dtype('u1').__reduce__()[2], protocol=2))[2:-1]
    dtype = global_('numpy', 'dtype') + b'(' + text(b'u1') + b'\x89\x88tR' + state + b'b'

    def fill(n: int) -> bytes:  # the array's state: (1, (n,), dtype, False, n bytes), then BUILD
        return b'(K\x01J' + n.to_bytes(4, 'little') + b'\x85' + dtype + b'\x89' + text(b'A' * n) + b'tb'

    data = (b'\x80\x02(' + global_('numpy.core.multiarray', '_reconstruct') + b'(' + global_('numpy', 'ndarray')
            + b'K\x00\x85' + text(b'b') + b'tRq\x00' + fill(size)
            + global_('torch._utils', '_rebuild_device_tensor_from_numpy') + b'(h\x00' + global_('torch', 'uint8')
            + text(b'cpu') + b'\x89tR' + b'h\x00' + fill(8) + b't.')
    buffer = io.BytesIO()
    torch.save({}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, 'w') as out:
        for info in source.infolist():
            out.writestr(info.filename, data if info.filename.endswith('data.pkl') else source.read(info))


def test_an_array_filled_twice_is_refused(tmp_path):
    """It loaded, and the tensor read freed memory (a large one crashed the process)."""
    from mpvit.serialization import safe_load

    _refilled_array_checkpoint(tmp_path / 'refilled.pth', 4096)
    with pytest.raises(CheckpointError, match=r'refilled.pth holds a numpy array given its contents twice: refused'):
        safe_load(tmp_path / 'refilled.pth')


def test_every_reference_to_numpy_data_is_converted(tmp_path):
    """A tuple met twice and dict keys hold plain numpy objects, not the reader's stand-ins."""
    from mpvit.serialization import safe_load

    pair = (np.dtype('f4'), np.arange(3))
    torch.save({'a': pair, 'b': pair, 'keys': {np.dtype('i8'): 1}, 'set': {np.float64(2.0)}}, tmp_path / 'shared.pth')
    loaded = safe_load(tmp_path / 'shared.pth')
    for name in ('a', 'b'):
        assert type(loaded[name][0]) is type(np.dtype('f4')) and type(loaded[name][1]) is np.ndarray, name
    assert [type(k) for k in loaded['keys']] == [type(np.dtype('i8'))] and loaded['set'] == {2.0}
    assert loaded['a'] is loaded['b']


def test_plain_numpy_data_of_every_kind_still_loads(tmp_path):
    from mpvit.serialization import safe_load

    values = {'b': np.array([True, False]), 'i': np.arange(3, dtype=np.int16), 'u': np.arange(3, dtype='>u4'),
              'f': np.linspace(0, 1, 4, dtype=np.float16), 'c': np.array([1j], np.complex128), 'S': np.array([b'xy']),
              'U': np.array(['cat', 'dog']), 'scalar': np.float64(0.25), 'dtype': np.dtype('int8'),
              'fortran': np.asfortranarray(np.arange(6.0).reshape(2, 3)), 'empty': np.zeros((0, 4), np.float32)}
    torch.save(values, tmp_path / 'plain.pth')
    with open(tmp_path / 'plain.pkl', 'wb') as f:
        pickle.dump(values, f, protocol=2)
    for name in ('plain.pth', 'plain.pkl'):
        loaded = safe_load(tmp_path / name)
        for key, value in values.items():
            assert type(loaded[key]) is type(value), (name, key, type(loaded[key]))
            if isinstance(value, np.ndarray):
                assert loaded[key].dtype == value.dtype.newbyteorder('=') and (loaded[key] == value).all()
                assert loaded[key].flags.f_contiguous == value.flags.f_contiguous
            else:
                assert loaded[key] == value


# ------------------------------------------------------------------------------------------ usable weights

BAD_WEIGHTS = {
    'nan': (lambda t: torch.full_like(t, float('nan')), r'holds \d[\d,]* non-finite values? \(NaN or inf\)'),
    'int': (lambda t: t.long(), r'is torch.int64 where the model\'s torch.float32 belongs'),
    'meta': (lambda t: torch.empty(t.shape, device='meta'), r'is a meta tensor .* with no data'),
}


def _spoil(state: Dict[str, torch.Tensor], key: str, kind: str) -> Dict[str, torch.Tensor]:
    return {**state, key: BAD_WEIGHTS[kind][0](state[key])}


@pytest.fixture(scope='module')
def classifier():
    return timm.create_model('mpvit_tiny', num_classes=2)


@pytest.mark.parametrize('kind', list(BAD_WEIGHTS))
def test_timm_and_the_classification_loaders_refuse_weights_that_are_none(kind, classifier, tmp_path):
    path = tmp_path / f'{kind}.pth'
    torch.save({'model': _spoil(classifier.state_dict(), 'stem.0.conv.weight', kind)}, path)
    match = rf'{kind}.pth: .*stem.0.conv.weight {BAD_WEIGHTS[kind][1]}'
    with pytest.raises(CheckpointError, match=match):
        timm.create_model('mpvit_tiny', num_classes=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointError, match=match):
        load_backbone_weights(classifier, str(path), head='require')  # classification/main.py --eval / --resume
    image = tmp_path / 'x.png'
    from PIL import Image

    Image.new('RGB', (32, 32)).save(image)
    with pytest.raises(CheckpointError, match=match):  # it used to print nan% for every class
        load_script('tools/predict.py').main([str(image), '--model', 'mpvit_tiny', '--weights', str(path)])


@pytest.mark.parametrize('kind', list(BAD_WEIGHTS))
def test_converter_writes_nothing_from_weights_that_are_none(kind, tmp_path):
    weights = {'layer.weight': torch.ones(3, 2), 'layer.bias': torch.zeros(3),
               'bn.num_batches_tracked': torch.tensor(4)}
    torch.save({'model': _spoil(weights, 'layer.weight', kind)}, tmp_path / 'src.pth')
    pattern = BAD_WEIGHTS[kind][1].replace("the model\\'s torch.float32", 'a floating-point one')
    with pytest.raises(CheckpointError, match=rf'src.pth: layer.weight {pattern}'):
        load_script('tools/convert_checkpoint.py').main([str(tmp_path / 'src.pth'), str(tmp_path / 'c.safetensors')])
    assert not list(tmp_path.glob('c.*')) and not list(tmp_path.glob('.c.*'))
    torch.save({'model': weights}, tmp_path / 'ok.pth')  # an integer counter is no float slot
    load_script('tools/convert_checkpoint.py').main([str(tmp_path / 'ok.pth'), str(tmp_path / 'c.safetensors')])

