"""What the training drivers share: YAML defaults, output checks, seeding, atomic checkpoints, RNG state,
cross-process sums, autocast. Distributed set-up itself is timm's ``init_distributed_device``.

Small on purpose: each driver stays readable top to bottom; these are the parts
whose subtle details (atomic replace, numpy's RNG in a ``weights_only``
checkpoint, a probe write before hours of work) must not differ between them.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

from mpvit.checkpoint import CheckpointError

__all__ = ['USER_ERRORS', 'all_reduce_sum', 'autocast', 'ensure_writable_dir', 'error_line', 'gather_rng_states',
           'is_main_process', 'rng_state', 'save_atomic', 'seed_everything', 'set_rng_state',
           'user_errors_in_one_line', 'yaml_defaults']


def yaml_defaults(parser: argparse.ArgumentParser, path: str | os.PathLike) -> None:
    """Make the ``key: value`` pairs of a YAML file ``parser``'s defaults (command-line flags still win).

    Keys are argument names (``drop_path`` or ``drop-path``); a key that is not one is refused with the
    file and key named, rather than silently ignored.
    """
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f'--config {path}: {e.strerror or e}')
    if not isinstance(values, dict):
        parser.error(f'{path}: expected a mapping of argument names to values')
    values = {str(k).replace('-', '_'): v for k, v in values.items()}
    unknown = sorted(set(values) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f'{path}: unknown keys {unknown}')
    parser.set_defaults(**values)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's ``random`` (drivers pass ``seed + rank``)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> List[float]:
    """Element-wise sums over all processes (float64), or ``values`` back when not distributed."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def ensure_writable_dir(path: str | os.PathLike, what: str = 'output directory') -> Path:
    """Create ``path`` and prove it writable with a probe file, or raise one clear ``ValueError`` naming it.

    Called before any model is built, so that a bad ``--output-dir`` fails in a second rather than at
    the first checkpoint, after an epoch of work.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix='.write_test_'):
            pass
    except OSError as e:
        raise ValueError(f'{what} {path} cannot be created or written: {e.strerror or e}') from None
    return path


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary name, then rename: an interruption never leaves a truncated checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """torch / numpy / Python (and CUDA) RNG state of this process, loadable with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every process's :func:`rng_state`, by rank (for the checkpoint, which rank 0 writes)."""
    if not dist.is_initialized():
        return [rng_state()]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state['torch'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def autocast(amp: str, device_type: str) -> ContextManager:
    """Mixed precision for ``--amp none | bf16 | fp16``."""
    if amp == 'none':
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


# What a user's input causes (bad paths, data, checkpoints, arguments): one line, not a traceback.
USER_ERRORS = (CheckpointError, FileNotFoundError, KeyError, ValueError)


def error_line(err: BaseException) -> str:
    """The one line to print for a user error, also when a DataLoader worker raised it (PyTorch then
    wraps the original traceback into the message, whose last line is ``Type: message``)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        last = lines[-1]
        return last.split(': ', 1)[1] if last.startswith(type(err).__name__ + ': ') else last
    return str(err)


@contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """For a driver's ``__main__``: print a user error as ``error: ...`` and exit with status 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f'error: {error_line(err)}', file=sys.stderr)
        sys.exit(2)
