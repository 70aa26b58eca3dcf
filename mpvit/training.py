"""What the training drivers share: YAML defaults, output checks, seeding, logging, atomic checkpoints in one
layout, the per-epoch log, RNG state, cross-process sums, autocast, parameter counts. Distributed set-up itself
is timm's ``init_distributed_device``.

Small on purpose: each driver stays readable top to bottom; these are the parts
whose subtle details (atomic replace, numpy's RNG in a ``weights_only``
checkpoint, a probe write before hours of work) must not differ between them.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ContextManager, Dict, Iterator, List, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

from mpvit.errors import DivergenceError, InvalidInputError, UserError, first_few
from mpvit.serialization import CheckpointError, atomic_file

__all__ = [
    'CHECKPOINT_KEYS',
    'LOG_FILE',
    'LossWatch',
    'OutputError',
    'Resumed',
    'USER_ERRORS',
    'all_reduce_sum',
    'autocast',
    'check_minimums',
    'count_parameters',
    'ensure_writable_dir',
    'epoch_row',
    'error_line',
    'gather_rng_states',
    'is_main_process',
    'parse_args_with_config',
    'read_log',
    'restore_training_state',
    'rng_state',
    'save_atomic',
    'save_training_checkpoint',
    'seed_everything',
    'set_rng_state',
    'setup_logging',
    'user_errors_in_one_line',
    'write_log',
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


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the ``-c/--config`` YAML file's values as defaults (:func:`yaml_defaults`).

    ``parser`` declares ``-c/--config`` itself (for ``--help``); a small parser finds the file first, so that
    ``--help`` and every later error already see the YAML's defaults.
    """
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument('-c', '--config')
    config = probe.parse_known_args(argv)[0].config
    if config:
        yaml_defaults(parser, config)
    return parser.parse_args(argv)


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, minimums: Dict[str, int]) -> None:
    """``parser.error`` for an argument below its minimum (``None``: not set, allowed), before any work."""
    for name, low in minimums.items():
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name.replace('_', '-')} {value}: must be at least {low}")


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged (a redirected or captured stream included)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(name: str) -> logging.Logger:
    """The driver's logger ``name``: timestamped lines on stdout (as DeiT's and Deformable DETR's prints were),
    INFO on the main process only, so that N processes do not print every line N times.

    The handler sits on the ``mpvit`` logger (once, however often a driver's ``main`` runs in one process), so
    the warnings of ``mpvit.*`` modules come out the same way; records still propagate to the root logger.
    """
    package = logging.getLogger('mpvit')
    if not any(isinstance(h, _StdoutHandler) for h in package.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S'))
        package.addHandler(handler)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    return logger


def _with_param_strides(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    if grad.stride() == param.stride():
        return grad
    if all(g == q or size == 1 for g, q, size in zip(grad.stride(), param.stride(), grad.shape)):
        return grad.as_strided(param.size(), param.stride())  # the same memory: only a size-1 dim's stride differs
    return torch.empty_strided(param.size(), param.stride(), dtype=grad.dtype, device=grad.device).copy_(grad)


def align_gradient_strides(model: nn.Module) -> nn.Module:
    """Give every multi-dimensional parameter's gradient the parameter's strides (a hook; returns ``model``).

    DDP copies each gradient into a bucket laid out like its parameter and warns ("Grad strides do not match
    bucket view strides") when they differ. MPViT's maps are channels-last from the stem on, so its convs (and
    the heads' convs that read its maps) get channels-last weight gradients for contiguous weights, and a
    depthwise kernel's gradient may differ in the stride of its size-1 dim only. The hook re-views the latter
    for free and lays out the former once, the copy DDP would otherwise make with strided reads. For the
    model that DDP wraps; without DDP it is not needed.
    """
    for param in model.parameters():
        if param.requires_grad and param.dim() > 1:
            param.register_hook(lambda grad, param=param: _with_param_strides(grad, param))
    return model


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def loader_workers(wanted: int) -> int:
    """A default data-loader worker count: ``wanted``, but no more than the usable CPUs (more only compete for
    them, and torch warns)."""
    return max(0, min(wanted, usable_cpus()))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, a shared tensor once (as ``model.parameters()`` yields them): the papers' #params."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
            raise DivergenceError(self.message(f'the weights are not finite ({first_few(bad, show=3)})', where))

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


def autocast(amp: str, device: torch.device | str) -> ContextManager:
    """Mixed precision for ``--amp none | bf16 | fp16`` on ``device`` (``'cuda:1'``, ``'cpu'``, a
    ``torch.device``): the drivers' one form, used as is in every forward pass."""
    if amp == 'none':
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type,
                          dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


# ---------------------------------------------------------------------------- training checkpoints and log

# Every resumable training checkpoint, of every driver, has these keys (the names of the authors' DeiT and
# Deformable DETR code); a driver adds what its weights need to be used on their own (class names, input).
# timm.utils.CheckpointSaver does not fit: it torch.saves in place (an interruption truncates the file), pickles
# the args Namespace (not loadable with weights_only=True), names the weights 'state_dict', has no RNG state or
# log rows and keeps the top-k files by a metric; nor does update_summary (append-only CSV, its columns fixed by
# the first row: no trimming on resume, no row of another shape).
CHECKPOINT_KEYS = ('model', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'step', 'rng', 'args', 'log')
# Keys of checkpoints written before the drivers shared one layout, read under their new names.
_RENAMED_KEYS = {'scheduler': 'lr_scheduler'}  # classification/main.py until the layouts were unified

# The per-epoch metrics of every driver: one JSON object a line (DeiT's and Deformable DETR's log.txt).
LOG_FILE = 'log.txt'


def save_training_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                             lr_scheduler: Any, scaler: torch.amp.GradScaler, *, epoch: int, step: int,
                             args: argparse.Namespace, log: Sequence[Mapping[str, Any]], watch: LossWatch,
                             extra: Mapping[str, Any] | None = None) -> None:
    """Write the checkpoint a run resumes from, in the one layout (:data:`CHECKPOINT_KEYS` plus ``extra``).

    Called by every process at the same point: each refuses weights that are not finite (so that all stop
    together), the RNG states of all are gathered, and the main process saves them atomically.
    """
    state_dict = model.state_dict()
    watch.check_weights(state_dict, f'the end of epoch {epoch}')
    rngs = gather_rng_states()
    if not is_main_process():
        return
    state = dict(model=state_dict, optimizer=optimizer.state_dict(), lr_scheduler=lr_scheduler.state_dict(),
                 scaler=scaler.state_dict(), epoch=epoch, step=step, rng=rngs, args=vars(args), log=list(log))
    clash = sorted(set(extra or {}) & set(state))
    if clash:
        raise ValueError(f'extra checkpoint keys {clash} would replace the shared ones')
    save_atomic({**state, **(extra or {})}, path)


class Resumed(NamedTuple):
    """Where a restored run continues: the next epoch, the optimizer steps so far and the log's rows."""
    epoch: int
    step: int
    log: List[Dict[str, Any]]


def restore_training_state(state: Mapping[str, Any], path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                           lr_scheduler: Any, scaler: torch.amp.GradScaler,
                           log_path: str | os.PathLike) -> Resumed:
    """Load what :func:`save_training_checkpoint` wrote, except the weights (each driver has its own checks
    for them): optimizer, schedule, scaler, this process's RNG state, and the log rows up to the epoch, which
    are written back to ``log_path`` (rows of later epochs dropped; rows the checkpoint holds that the file
    lost, restored).

    A checkpoint with the old classification key ``scheduler`` is read as well; one without the training
    state is refused in one line.
    """
    state = {_RENAMED_KEYS.get(k, k): v for k, v in state.items()}
    missing = [k for k in ('optimizer', 'lr_scheduler', 'scaler', 'epoch') if k not in state]
    if missing:
        raise CheckpointError(f'{path} is not a training checkpoint to resume (no {", ".join(missing)}); '
                              'start from its weights with --pretrained')
    optimizer.load_state_dict(state['optimizer'])
    lr_scheduler.load_state_dict(state['lr_scheduler'])
    scaler.load_state_dict(state['scaler'])
    if state.get('rng'):
        rank = dist.get_rank() if dist.is_initialized() else 0
        set_rng_state(state['rng'][min(rank, len(state['rng']) - 1)])
    epoch = int(state['epoch'])
    rows = {int(row['epoch']): dict(row) for row in read_log(log_path, up_to_epoch=epoch)}
    rows.update({int(row['epoch']): dict(row) for row in state.get('log') or ()})  # the checkpoint's win
    log = [rows[e] for e in sorted(rows)]
    if is_main_process() and log:
        write_log(log_path, log)
    return Resumed(epoch + 1, int(state.get('step', 0)), log)


def epoch_row(epoch: int, train: Mapping[str, Any], test: Mapping[str, Any], **extra: Any) -> Dict[str, Any]:
    """One line of :data:`LOG_FILE`, DeiT's form: ``epoch``, ``train_*`` and ``test_*`` metrics, then ``extra``."""
    return {'epoch': epoch, **{f'train_{k}': v for k, v in train.items()},
            **{f'test_{k}': v for k, v in test.items()}, **extra}


def read_log(path: str | os.PathLike, up_to_epoch: int) -> List[Dict[str, Any]]:
    """The rows of a :data:`LOG_FILE` up to ``up_to_epoch`` (none if there is no file)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get('epoch'), int)):
            raise InvalidInputError(f'{path} line {number}: not a JSON object with an integer "epoch" '
                                    '(fix or remove the line to resume)')
        if row['epoch'] <= up_to_epoch:
            rows.append(row)
    return rows


def write_log(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write all rows so far atomically (one short line per epoch): never a half-written line."""
    text = ''.join(json.dumps(dict(row)) + '\n' for row in rows)
    try:
        with atomic_file(Path(path)) as f:
            f.write(text.encode())
    except OSError as e:
        raise OutputError(f'cannot write {path}: {e.strerror or e}') from None


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
