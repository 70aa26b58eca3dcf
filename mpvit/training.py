"""What the training drivers share: YAML defaults, output checks, seeding, atomic checkpoints, RNG state,
cross-process sums, autocast. Distributed set-up itself is timm's ``init_distributed_device``.

Small on purpose: each driver stays readable top to bottom; these are the parts
whose subtle details (atomic replace, numpy's RNG in a ``weights_only``
checkpoint, a probe write before hours of work) must not differ between them.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

from mpvit.errors import DivergenceError, InvalidInputError, UserError
from mpvit.serialization import atomic_file

__all__ = [
    'LossWatch',
    'OutputError',
    'USER_ERRORS',
    'all_reduce_sum',
    'autocast',
    'check_minimums',
    'ensure_writable_dir',
    'error_line',
    'gather_rng_states',
    'is_main_process',
    'rng_state',
    'save_atomic',
    'seed_everything',
    'set_rng_state',
    'user_errors_in_one_line',
    'yaml_defaults',
]


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
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''
        parser.error(f'--config {path}: not valid YAML{where}: {getattr(e, "problem", None) or e}')
    if not isinstance(values, dict):
        parser.error(f'{path}: expected a mapping of argument names to values')
    values = {str(k).replace('-', '_'): v for k, v in values.items()}
    unknown = sorted(set(values) - {a.dest for a in parser._actions})
    if unknown:
        parser.error(f'{path}: unknown keys {unknown}')
    parser.set_defaults(**values)


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: Dict[str, int]) -> None:
    """``parser.error`` for an argument below its minimum (``None``: not set, allowed), before any work."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {low}")


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
        raise InvalidInputError(f'{what} {path} cannot be created or written: {e.strerror or e}') from None
    return path


class OutputError(UserError, OSError):
    """A checkpoint or log that cannot be written (full disk, read-only or vanished folder)."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a new temporary file, then rename: an interruption never leaves a truncated checkpoint.

    The temporary file is created exclusively under a random name (never through a link planted in the
    folder) and removed on any failure; a write that fails (full disk, read-only folder) is one
    :class:`OutputError` line, and the previous checkpoint at ``path`` stays as it was.
    """
    path = Path(path)
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports an OS write failure as a RuntimeError, or raises one while closing after it
        os_error = next((x for x in (e, e.__context__, e.__cause__) if isinstance(x, OSError)), None)
        if os_error is None and 'write' not in str(e):
            raise
        reason = (os_error.strerror or str(os_error)) if os_error else str(e).strip().splitlines()[-1]
        raise OutputError(f'cannot write {path}: {reason}; the previous checkpoint, if any, is intact') from None


class LossWatch:
    """The one divergence rule of every driver: stop at the first non-finite loss, naming where it happened
    and the last finite loss, before anything of it is saved.

    ``check(loss, where)`` returns the loss as a float when finite, else raises :class:`DivergenceError`; in a
    distributed run the processes agree first (one all-reduce of a flag), so that all of them stop at the
    same step instead of the others waiting for the one that stopped. ``check_weights(state, where)``
    refuses to save weights a step made non-finite although its loss was finite.
    """

    def __init__(self) -> None:
        self.last_finite: float | None = None
        self.last_where = ''
        self.current = ''  # where the step under way is, for checks made before its loss

    def check(self, loss: torch.Tensor | float, where: str) -> float:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        finite = math.isfinite(value)
        agreed = self.everywhere(finite, loss.device) if isinstance(loss, torch.Tensor) else finite
        if not finite:
            raise DivergenceError(self.message(f'loss is {value}', where))
        if not agreed:
            raise DivergenceError(self.message('the loss of another process is not finite', where))
        self.last_finite, self.last_where = value, where
        return value

    @staticmethod
    def everywhere(finite: bool, device: torch.device | str) -> bool:
        """Whether ``finite`` holds in every process (an all-reduce each calls at the same point), or just here."""
        if not (dist.is_available() and dist.is_initialized()):
            return finite
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        dist.all_reduce(flag)
        return not flag.item()

    def check_weights(self, state: Mapping[str, Any], where: str) -> None:
        bad = [k for k, v in state.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            shown = ', '.join(bad[:3]) + (f', ... ({len(bad)} in all)' if len(bad) > 3 else '')
            raise DivergenceError(self.message(f'the weights are not finite ({shown})', where))

    def message(self, what: str, where: str) -> str:
        last = (f'last finite loss {self.last_finite:.4g} at {self.last_where}' if self.last_finite is not None
                else 'no finite loss before it')
        return (f'training diverged: {what} at {where} ({last}); stopped before saving it, the last checkpoint '
                f'is untouched (lower the learning rate, check the data, or use bf16 instead of fp16)')


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


# What a user's input causes (bad paths, data, checkpoints, arguments), as the checks raise it: one line, not a
# traceback. Everything else, a ValueError from a bug included, keeps its traceback.
USER_ERRORS = (UserError,)


def error_line(err: BaseException) -> str:
    """The one line to print for a user error, also when a DataLoader worker raised it (PyTorch then
    wraps the original traceback into the message, whose last line is ``Type: message``)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Caught '):
        last = lines[-1]
        names = (type(err).__name__, f'{type(err).__module__}.{type(err).__qualname__}')
        return last.split(': ', 1)[1] if last.startswith(tuple(n + ': ' for n in names)) else last
    return str(err)


@contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """For a driver's ``__main__``: print a user error as ``error: ...`` and exit with status 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f'error: {error_line(err)}', file=sys.stderr)
        sys.exit(2)
