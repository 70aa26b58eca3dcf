"""Reading weight files without running code from them, and writing them as safetensors.

A checkpoint found on a mirror or a shared drive is untrusted input: a pickle can
call any Python function while it loads. Every reader in this repository goes
through :func:`safe_load`, which never unpickles arbitrary objects:

- ``.safetensors``: tensors only, by construction;
- PyTorch files: ``torch.load(weights_only=True)`` with an explicit allowlist of the
  harmless, data-only types that real training checkpoints carry (:func:`safe_globals`);
- Detectron2 / Caffe2 ``.pkl`` files: a restricted unpickler that builds numpy arrays
  and plain containers, nothing else.

Anything else is refused in one line naming the file and the type it asked for;
:func:`load_dropping_objects` (``tools/convert_checkpoint.py --drop-objects``) reads such a
file's tensors and plain data with inert stand-ins for the other objects (still
``weights_only=True``, nothing of the file runs) and re-saves its weights as safetensors.

Zip-format PyTorch files are also checked against the CRC-32 of every member
first, so a file corrupted on disk or in transfer is refused instead of
evaluated (torch's reader does not check them).
"""
from __future__ import annotations

import argparse
import codecs
import os
import pickle
import re
import tempfile
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Tuple, Union

import torch

from mpvit import safe_numpy
from mpvit.errors import CheckpointError, MissingFileError

__all__ = ['CheckpointError', 'atomic_file', 'check_container', 'ensure_checkpoint_file', 'load_dropping_objects',
           'safe_load', 'safe_load_stream', 'safe_globals', 'save_safetensors', 'tensors_for_safetensors', 'verify_zip']


def _numpy_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """numpy arrays, scalars and dtypes, as numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) pickle them,
    through the checking stand-ins of :mod:`mpvit.safe_numpy` (never numpy's own functions)."""
    return list(safe_numpy.PICKLE_GLOBALS)


_RECORD_CLASSES: List[type] = []


def _method_of_record(obj: Any, name: str) -> Any:
    """``getattr`` as the allowlist lets a pickle call it: only to name a public method of an allowlisted
    record class (mmengine pickles ``HistoryBuffer.min`` that way). The builtin itself would reach any
    object's globals, hence code."""
    if any(obj is cls for cls in _RECORD_CLASSES) and not name.startswith('_') and callable(vars(obj).get(name)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f'getattr({getattr(obj, "__name__", type(obj).__name__)}, {name!r}) is not allowed')


def _framework_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """Data-only classes of the frameworks' own checkpoint writers (imported only where installed)."""
    import importlib.util

    found: List[Union[Callable, Tuple[Callable, str]]] = []
    if importlib.util.find_spec('mmengine') is not None:
        # mmengine's Runner saves its MessageHub, whose scalars are HistoryBuffers (numpy arrays inside,
        # and their statistics methods, pickled as getattr(HistoryBuffer, 'mean')).
        try:
            from mmengine.logging.history_buffer import HistoryBuffer
        except ImportError:  # a broken mmengine: its checkpoints are refused, naming HistoryBuffer
            return found

        if HistoryBuffer not in _RECORD_CLASSES:
            _RECORD_CLASSES.append(HistoryBuffer)
        found += [HistoryBuffer, (_method_of_record, 'builtins.getattr')]
    return found


def safe_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The allowlist beyond torch's defaults: ``argparse.Namespace`` (DeiT-style ``args``), numpy data types
    (mmengine / Detectron2 metadata, RNG states), and framework record types; no callables that run code."""
    return [argparse.Namespace, *_numpy_globals(), *_framework_globals()]


def _convert_hint(path: str) -> str:
    return (f'to keep its weights and leave such objects out: python tools/convert_checkpoint.py --drop-objects '
            f'{path} {os.path.splitext(os.path.basename(path))[0]}.safetensors')


def _is_safetensors(path: str) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


_CRC_CHECKED: Dict[str, Tuple[int, ...]] = {}


def _version(path: str) -> Tuple[str, Tuple[int, ...]]:
    """A file's identity for the caches: a replaced file (new inode or change time) is checked again."""
    stat = os.stat(path)
    return os.path.realpath(path), (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


def verify_zip(path: str) -> None:
    """Refuse a zip-format checkpoint whose members do not match their stored CRC-32 (checked once per file
    version: path, size and modification time)."""
    key, version = _version(path)
    if _CRC_CHECKED.get(key) == version:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is a damaged checkpoint ({e}); download or copy it again') from None
    if bad is not None:
        raise CheckpointError(f'{path} is corrupted: the bytes of {bad} do not match their stored checksum '
                              '(damaged on disk or in transfer); download or copy it again')
    _CRC_CHECKED[key] = version


def check_container(path: str, name: str | None = None) -> str:
    """The container of a checkpoint file ('safetensors', 'zip', 'pickle'), refusing a missing, truncated or
    corrupted one. ``name``: the file name that decides the format (default: ``path``'s)."""
    name = name or path
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory, not a checkpoint file')
    if not os.path.isfile(path):
        raise MissingFileError(f'checkpoint file not found: {path}')
    safetensors = _is_safetensors(path)
    if name.endswith('.safetensors'):
        if not safetensors:
            raise CheckpointError(f'{path} is not a readable safetensors file (truncated download?)')
        return 'safetensors'
    if safetensors:
        raise CheckpointError(f'{path} is a safetensors file under another name; rename it to '
                              f'{os.path.splitext(path)[0]}.safetensors (loaders choose the format by the name)')
    if zipfile.is_zipfile(path):
        verify_zip(path)
        return 'zip'
    with open(path, 'rb') as f:
        head = f.read(1)
    if head != b'\x80':
        raise CheckpointError(
            f'{path} is not a readable PyTorch checkpoint (neither a zip archive nor a pickle; truncated download?)')
    return 'pickle'


_CHECKED: Dict[str, Tuple[int, ...]] = {}


def ensure_checkpoint_file(path: str) -> None:
    """Refuse, in one line naming the file, a checkpoint that is missing, damaged, or that would build
    objects outside the allowlist, without loading its tensors: the drivers call it before any work.

    Zip members are checked against their CRC-32 and the pickle is run through the same safe unpickler
    as the load, with the tensors memory-mapped (not read); a legacy pickle is read once; a safetensors
    header is parsed. Checked once per file version (path, size, times, inode).
    """
    kind = check_container(path)
    key, version = _version(path)
    if _CHECKED.get(key) == version:
        return
    if kind == 'zip':
        try:  # the same unpickler as the load, tensors mapped rather than read
            _read_torch(path, mmap=True)
        except CheckpointError as e:
            if isinstance(e, _RefusedContentError):
                raise
            _read_torch(path)  # members compressed by a zip tool, or no mmap here: read it as the load will
    elif kind == 'safetensors':
        _read_safetensors(path, header_only=True)
    elif path.endswith('.pkl'):
        _read_pickle(path)
    else:  # a legacy (non-zip) torch file: only a full read shows what it holds
        _read_torch(path)
    _CHECKED[key] = version


# Detectron2 / Caffe2 model-zoo pickles hold numpy arrays in plain containers.
_PICKLE_DATA_GLOBALS: Dict[Tuple[str, str], Any] = {
    ('collections', 'OrderedDict'): OrderedDict, ('_codecs', 'encode'): codecs.encode,
    **{tuple(name.rsplit('.', 1)): stand_in for stand_in, name in safe_numpy.PICKLE_GLOBALS},
}


class _DataUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and containers (numpy's through :mod:`mpvit.safe_numpy`); any other
    global is refused, never imported."""

    def find_class(self, module: str, name: str) -> Any:
        if module == '__builtin__':  # protocol 2 names builtins as Python 2 did (bytes() of an empty array)
            module = 'builtins'
        if (module, name) in _PICKLE_DATA_GLOBALS:
            return _PICKLE_DATA_GLOBALS[module, name]
        raise _RefusedGlobal(f'{module}.{name}')


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _read_pickle(path: str) -> Any:
    try:
        with open(path, 'rb') as f:
            return safe_numpy.finish(_DataUnpickler(f, encoding='latin1').load())
    except safe_numpy.RefusedData as e:
        raise _data_refusal(path, e) from None
    except _RefusedGlobal as e:
        raise _refusal(path, [str(e)]) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, ImportError,
            UnicodeDecodeError) as e:
        raise CheckpointError(f'{path} is not a readable pickle ({type(e).__name__}: {e})') from None


def _unsafe_globals(path: str, message: str) -> List[str]:
    names: List[str] = []
    if path and zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 (only for the message; the refusal stands either way)
            names = []
    found = re.findall(r'GLOBAL ([\w.]+)', message) + re.findall(r"but got <class '([\w.]+)'>", message)
    return names or list(dict.fromkeys(found))


def _read_torch(path: str, mmap: bool = False) -> Any:
    allowlist = safe_globals()
    with torch.serialization.safe_globals(allowlist):
        try:
            return safe_numpy.finish(torch.load(path, map_location='cpu', weights_only=True, mmap=mmap))
        except safe_numpy.RefusedData as e:
            raise _data_refusal(path, e) from None
        except pickle.UnpicklingError as e:
            message = str(e)
            if 'Weights only load failed' not in message:
                raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({message.splitlines()[0]})') \
                    from None
            names = _unsafe_globals(path, message)
        except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError,
                AttributeError) as e:  # a damaged pickle, or an allowed type rebuilt from bad arguments
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first})') \
                from None
    raise _refusal(path, names)


def safe_load_stream(stream: Any, what: str = 'the checkpoint stream') -> Any:
    """A checkpoint from an open binary stream (an object store's bytes), by the same allowlist."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return safe_numpy.finish(torch.load(stream, map_location='cpu', weights_only=True))
        except safe_numpy.RefusedData as e:
            raise _data_refusal(what, e) from None
        except pickle.UnpicklingError as e:
            names = _unsafe_globals('', str(e))
        except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError,
                AttributeError) as e:
            raise CheckpointError(f'{what} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})') from None
    raise _refusal(what, names)


class _RefusedContentError(CheckpointError):
    """A file refused for what it holds (not for damage): a second, full read would refuse it again."""


def _refusal(path: str, names: List[str], hint: bool = True) -> CheckpointError:
    what = ', '.join(names) if names else 'a Python object that is not a tensor or a known data type'
    return _RefusedContentError(f'{path} asks to unpickle {what}: refused, as loading it could run code '
                                '(only tensors and plain data are read)' + (f'; {_convert_hint(path)}' if hint else ''))


def _data_refusal(path: str, error: safe_numpy.RefusedData) -> CheckpointError:
    return _RefusedContentError(f'{path} holds {error}: refused, only numpy data of bool, number, bytes and str '
                                'types is read (other or edited dtypes make numpy take the file\'s bytes as memory '
                                'addresses); get the file from a source you trust')


def _read_safetensors(path: str, header_only: bool = False) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if header_only:
            with safe_open(path, framework='pt') as f:
                f.keys()
            return {}
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable safetensors file ({e}; truncated download?)') from None


def safe_load(path: Union[str, os.PathLike]) -> Any:
    """Load a local checkpoint file (a path or ``pathlib.Path``, as ``torch.load`` takes) on the CPU without
    running code from it (see the module docstring).

    ``.safetensors`` and Detectron2 ``.pkl`` files are recognised by name; anything else is read as a
    PyTorch file. Raises :class:`CheckpointError` (one line, naming the file) for a damaged file or one
    that asks to build objects outside the allowlist.
    """
    path = os.fspath(path)
    kind = check_container(path)
    if kind == 'safetensors':
        return _read_safetensors(path)
    if kind == 'pickle' and path.endswith('.pkl'):
        return _read_pickle(path)
    return _read_torch(path)


class _Dropped:
    """Stands in for an object of a type the reader does not import: keeps what it was built from as
    data, runs nothing (its methods only store their arguments)."""

    global_name = ''

    def __new__(cls, *args: Any, **kwargs: Any) -> _Dropped:
        obj = object.__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__['state'] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__['items'].append((key, value))

    def append(self, item: Any) -> None:
        self.__dict__['items'].append(item)

    def extend(self, items: Any) -> None:
        self.__dict__['items'].extend(items)

    def __repr__(self) -> str:
        return f'<dropped {self.global_name}>'


def _dropped_type(name: str) -> type:
    return type('Dropped', (_Dropped,), {'global_name': name})


# Never stood in for either: a checkpoint naming them is refused outright (torch's weights-only reader
# blocks them too).
_NEVER_READ = ('sys', 'os', 'posix', 'nt')


class _DroppingUnpickler(_DataUnpickler):
    """:class:`_DataUnpickler`, with any other global replaced by an inert :class:`_Dropped` type."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dropped: Dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except _RefusedGlobal:
            if module.split('.')[0] in _NEVER_READ:
                raise
            return self.dropped.setdefault(f'{module}.{name}', _dropped_type(f'{module}.{name}'))


def load_dropping_objects(path: str) -> Tuple[Any, List[str]]:
    """Read a checkpoint that holds objects of types outside the allowlist, still without running code:
    each such type is replaced by an inert stand-in, so the tensors and plain data come back and those
    objects are left out. For ``tools/convert_checkpoint.py --drop-objects``. Returns the checkpoint and
    the names of the types dropped; a file asking for ``os`` / ``sys`` functions is refused.

    PyTorch files are still read by ``torch.load(weights_only=True)``: the stand-ins join the allowlist
    under the names the file asks for.
    """
    kind = check_container(path)
    if kind == 'safetensors':
        return _read_safetensors(path), []
    if kind == 'pickle' and path.endswith('.pkl'):
        try:
            with open(path, 'rb') as f:
                unpickler = _DroppingUnpickler(f, encoding='latin1')
                return safe_numpy.finish(unpickler.load()), sorted(unpickler.dropped)
        except safe_numpy.RefusedData as e:
            raise _data_refusal(path, e) from None
        except _RefusedGlobal as e:
            raise _refusal(path, [str(e)], hint=False) from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                UnicodeDecodeError) as e:
            raise CheckpointError(f'{path} is not a readable pickle ({type(e).__name__}: {e})') from None
    dropped: Dict[str, type] = {}
    while True:  # each round stands in for the types the last one was refused (a zip file names all at once)
        with torch.serialization.safe_globals([*safe_globals(), *((t, n) for n, t in dropped.items())]):
            try:
                return safe_numpy.finish(torch.load(path, map_location='cpu', weights_only=True)), sorted(dropped)
            except safe_numpy.RefusedData as e:
                raise _data_refusal(path, e) from None
            except pickle.UnpicklingError as e:
                names = [n for n in _unsafe_globals(path, str(e)) if n not in dropped]
                if not names or any(n.split('.')[0] in _NEVER_READ for n in names):
                    raise _refusal(path, names or [str(e).strip().splitlines()[0]], hint=False) from None
            except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError,
                    AttributeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ''
                raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: '
                                      f'{first})') from None
        dropped.update((n, _dropped_type(n)) for n in names)


def tensors_for_safetensors(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """``state_dict`` as safetensors can store it: tensors only (numpy arrays converted), contiguous, and
    each storage once (tensors that share memory, like the reference's aliased ``cpe`` / ``crpe`` keys,
    are copied)."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for key, value in state_dict.items():
        tensor = torch.as_tensor(value).detach()
        if tensor.device.type != 'cpu':
            tensor = tensor.cpu()
        if tensor.untyped_storage().data_ptr() in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write ``path`` through a new temporary file in its folder, renamed over it once complete: readers never
    see a partial file, a failure leaves the previous one as it was and removes the temporary one. The
    temporary file is created exclusively under a random name (never through a link planted there)."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f'.{os.path.basename(path)}.',
                               suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep a shared copy from its readers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_safetensors(state_dict: Mapping[str, Any], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state_dict`` as a safetensors file, atomically (:func:`atomic_file`)."""
    from safetensors.torch import save

    data = save(tensors_for_safetensors(state_dict), metadata=dict(metadata or {}))
    with atomic_file(path) as f:
        f.write(data)
