"""numpy data rebuilt from a pickle only once its dtype is known to be plain numbers, bools or strings.

numpy pickles an array as ``_reconstruct(ndarray, ...)`` followed by a state holding a dtype and
raw bytes, and a dtype as ``numpy.dtype(spec)`` followed by a state with its byte order, fields
and flags. numpy trusts that state: a file that clears an object dtype's flags makes numpy take the
file's bytes as ``PyObject`` pointers, which crashes the process (or worse) when the array is
touched. So a checkpoint never reaches numpy's own functions. The classes and functions here stand
in for them under numpy's names (:data:`PICKLE_GLOBALS`, in torch's ``safe_globals`` and the
``.pkl`` unpickler alike):

- :class:`PickledDtype` (``numpy.dtype``) accepts a spec of kind bool, int, uint, float, complex,
  bytes or str only, and a state only if it equals the state numpy itself writes for that spec
  (any byte order); the real dtype is then built from the spec, never from the state;
- :class:`PickledArray` (``numpy.ndarray``) is filled only from raw bytes and a checked dtype;
- :func:`pickled_scalar` (``numpy.core.multiarray.scalar``) likewise.

Anything else raises :class:`RefusedData`, wherever the value sits in the file (touched later or not).
:func:`finish` turns the stand-ins of a loaded checkpoint into plain numpy arrays and dtypes.
"""
from __future__ import annotations

import argparse
import math
import re
from typing import Any, Callable, List, Tuple

import numpy as np

__all__ = ['PICKLE_GLOBALS', 'PickledArray', 'PickledDtype', 'RefusedData', 'finish', 'pickled_reconstruct',
           'pickled_bytes',
           'pickled_scalar']

_SAFE_KINDS = {'b': 'bool', 'i': 'int', 'u': 'uint', 'f': 'float', 'c': 'complex', 'S': 'bytes', 'U': 'str'}
_SPEC = re.compile(r'[biufcSU][0-9]{1,4}')
_BYTE_ORDERS = ('<', '>', '=', '|')
_core = np._core if hasattr(np, '_core') else np.core  # numpy 2.x, 1.x
_numpy_scalar = _core.multiarray.scalar


class RefusedData(Exception):  # noqa: N818 (raised through the unpickler, turned into a CheckpointError)
    """numpy data in a file that is not plain numbers, bools or strings (or whose pickled form was edited)."""


def _spec_dtype(spec: Any) -> np.dtype:
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise RefusedData(f'a numpy dtype {spec!r}')
    try:
        dtype = np.dtype(spec)
    except TypeError:
        raise RefusedData(f'a numpy dtype {spec!r} that numpy does not know') from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _SAFE_KINDS:
        raise RefusedData(f'a numpy dtype {spec!r} of kind {dtype.kind!r}')
    return dtype


class PickledDtype:
    """``numpy.dtype(spec, align, copy)`` then its state, as numpy pickles a dtype, checked (see the module
    docstring); :attr:`dtype` is the real dtype.

    Args:
        spec: the dtype's spec as numpy pickles it (``'f4'``, ``'i8'``, ``'U5'`` ...).
        align, copy: numpy's flags, which must be plain booleans.
    """

    dtype: Any = None  # also when a file creates one without calling it
    spec: Any = None

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        if align not in (0, 1) or copy not in (0, 1):  # bools, or ints in old pickles
            raise RefusedData(f'numpy.dtype({spec!r}, {align!r}, {copy!r})')
        self.dtype = _spec_dtype(spec)
        self.spec = spec

    def __setstate__(self, state: Any) -> None:
        if self.dtype is None:
            raise RefusedData('a numpy dtype given a state without a spec')
        canonical = np.dtype(self.spec).__reduce__()[2]
        if (not isinstance(state, tuple) or len(state) != len(canonical) or state[0] != canonical[0]
                or state[1] not in _BYTE_ORDERS or state[2:] != canonical[2:]):
            raise RefusedData(f'a numpy dtype {self.spec!r} with the edited state {state!r} (numpy writes '
                              f'{canonical!r})')
        order = state[1]
        self.dtype = np.dtype(self.spec).newbyteorder(order) if order in '<>' else np.dtype(self.spec)


def _real_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, PickledDtype) and dtype.dtype is not None:
        return dtype.dtype
    raise RefusedData(f'numpy data whose dtype is a {type(dtype).__name__}')


def _raw_bytes(data: Any, what: str) -> bytes:
    if isinstance(data, str):  # Python 2 pickles, read with encoding='latin1'
        data = data.encode('latin1')
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedData(f'{what} built from a {type(data).__name__} instead of raw bytes')
    return bytes(data)


class PickledArray(np.ndarray):
    """An array rebuilt from a pickle: created empty by :func:`pickled_reconstruct`, filled by ``__setstate__``
    once, only from raw bytes and a :class:`PickledDtype`. Never constructed directly (``numpy.ndarray(...)`` in
    a file is refused). A second fill is refused: numpy would free the memory of the first while a tensor the
    file made of it (``torch._utils._rebuild_device_tensor_from_numpy``) still reads it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledArray:
        raise RefusedData('a direct call of numpy.ndarray')

    def __setstate__(self, state: Any) -> None:
        if getattr(self, '_filled', False) or self.nbytes:
            raise RefusedData('a numpy array given its contents twice')
        self._filled = True
        if isinstance(state, tuple) and len(state) == 5:
            version, shape, dtype, fortran, data = state
        elif isinstance(state, tuple) and len(state) == 4:  # numpy's older layout, without the version
            version, (shape, dtype, fortran, data) = 1, state
        else:
            raise RefusedData(f'a numpy array with a state of type {type(state).__name__}')
        dtype = _real_dtype(dtype)
        if (version != 1 or not isinstance(shape, tuple) or fortran not in (0, 1)
                or not all(isinstance(n, int) and n >= 0 for n in shape)):
            raise RefusedData(f'a numpy array with the state (version {version!r}, shape {shape!r}, '
                              f'fortran {fortran!r})')
        data = _raw_bytes(data, f'a numpy array of dtype {dtype.str}')
        count = math.prod(shape)  # Python integers: no wrap-around
        if len(data) != count * dtype.itemsize or max(shape, default=0) >= 2 ** 62 or (count and not dtype.itemsize):
            raise RefusedData(f'a numpy array of shape {shape} and dtype {dtype.str} from {len(data)} bytes')
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))


def pickled_reconstruct(subtype: Any, shape: Any = (0,), dtype: Any = b'b') -> PickledArray:
    """``numpy.core.multiarray._reconstruct``: an empty :class:`PickledArray`, for its state to fill."""
    if subtype is not PickledArray:
        raise RefusedData(f'an array of the class {getattr(subtype, "__name__", type(subtype).__name__)}')
    return np.ndarray.__new__(PickledArray, (0,), np.uint8)


def pickled_scalar(dtype: Any, data: Any = b'') -> Any:
    """``numpy.core.multiarray.scalar``: a numpy scalar of a checked dtype from its raw bytes."""
    dtype = _real_dtype(dtype)
    data = _raw_bytes(data, f'a numpy scalar of dtype {dtype.str}')
    if len(data) != dtype.itemsize:
        raise RefusedData(f'a numpy scalar of dtype {dtype.str} from {len(data)} bytes')
    return _numpy_scalar(dtype, data)


def pickled_bytes(*args: Any) -> bytes:
    """``bytes()``: how protocol 2 pickles the empty raw data of an empty array (only that call is taken)."""
    if args:
        raise RefusedData(f'a call of bytes with {len(args)} arguments')
    return b''


def _names(name: str) -> List[str]:
    return [f'numpy.core.multiarray.{name}', f'numpy._core.multiarray.{name}']


# (stand-in, the global name a pickle asks for)
PICKLE_GLOBALS: List[Tuple[Callable, str]] = [
    (PickledDtype, 'numpy.dtype'), (PickledArray, 'numpy.ndarray'),
    *((pickled_reconstruct, n) for n in _names('_reconstruct')), *((pickled_scalar, n) for n in _names('scalar')),
    (pickled_bytes, 'builtins.bytes'),
]


def finish(obj: Any) -> Any:
    """``obj`` (a loaded checkpoint) with every :class:`PickledArray` as a plain ``numpy.ndarray`` and every
    :class:`PickledDtype` as its dtype: in containers (dict keys too) and the attributes of allowlisted objects
    (``args``). An object met twice is converted once (a tuple rebuilt once is the same tuple everywhere)."""
    done: dict = {}  # id -> the converted object (kept alive by ``keep``: ids stay unique)
    keep: list = []

    def walk(value: Any) -> Any:
        if isinstance(value, PickledArray):
            converted = value.view(np.ndarray)
        elif isinstance(value, PickledDtype):
            converted = value.dtype
        elif isinstance(value, (str, bytes, int, float, complex, type(None), np.ndarray, np.generic)):
            return value
        elif id(value) in done:
            return done[id(value)]
        else:
            done[id(value)] = value  # in place (or until rebuilt): a cycle ends here
            keep.append(value)
            converted = _walk_container(value, walk)
        done[id(value)] = converted
        keep.append(value)
        return converted

    return walk(obj)


def _walk_container(value: Any, walk: Callable[[Any], Any]) -> Any:
    if isinstance(value, dict):
        items = [(walk(k), walk(v)) for k, v in value.items()]
        value.clear()
        value.update(items)
    elif isinstance(value, list):
        value[:] = [walk(v) for v in value]
    elif type(value) is tuple:
        return tuple(walk(v) for v in value)
    elif type(value) is frozenset:
        return frozenset(walk(v) for v in value)
    elif isinstance(value, set):
        items = [walk(v) for v in value]
        value.clear()
        value.update(items)
    elif isinstance(value, argparse.Namespace) or (hasattr(value, '__dict__') and not isinstance(value, type)
                                                   and type(value).__module__.split('.')[0] != 'torch'):
        for key, item in list(vars(value).items()):
            setattr(value, key, walk(item))
    return value
