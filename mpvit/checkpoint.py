"""Reading MPViT weights from any of the released checkpoint formats.

The authors released the same backbone inside four wrappers:

==================  ====================================  =====================
format              where the weights sit                 backbone key prefix
==================  ====================================  =====================
classification      ``checkpoint["model"]`` or bare dict  (none)
Detectron2          ``checkpoint["model"]``               ``backbone.bottom_up.backbone.``
mmsegmentation      ``checkpoint["state_dict"]``          ``backbone.``
Deformable DETR     ``checkpoint["model"]``               ``backbone.0.backbone.``
==================  ====================================  =====================

plus transformers' ``TimmWrapper`` models (``timm_model.``) and safetensors files of any of
them. Files are read by :mod:`mpvit.serialization` (never running code from them) and found
by :mod:`mpvit.weights` (weights directory, Hub, URLs).

:func:`checkpoint_filter_fn` (timm's ``pretrained_filter_fn`` hook) turns any of
them into a state dict for :class:`mpvit.models.mpvit.MPViT`, and refuses a
checkpoint that does not fit with a short list of what is wrong, instead of
torch's wall of keys or a silently half-loaded model.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from mpvit.errors import first_few
from mpvit.serialization import CheckpointError, ensure_checkpoint_file, safe_load
from mpvit.weights import fetch, is_url

__all__ = ['BACKBONE_PREFIXES', 'CheckpointError', 'backbone_prefix', 'check_fit', 'check_usable',
           'checkpoint_filter_fn', 'checkpoint_tensors', 'drop_unused_norm_stats',
           'ensure_checkpoint_file', 'is_url', 'load_backbone_weights', 'local_checkpoint',
           'read_checkpoint', 'require_task_weights', 'unwrap_checkpoint']

_logger = logging.getLogger(__name__)

# Longest first: 'backbone.' is a prefix of the next two. 'timm_model.': transformers' TimmWrapper models.
# 'model.backbone.model.backbone.': our Deformable DETR (before its backbone became a wrapper: one level up).
BACKBONE_PREFIXES = ('backbone.bottom_up.backbone.', 'backbone.0.backbone.', 'backbone.', 'timm_model.',
                     'model.backbone.model.backbone.', 'model.backbone.model.')
_NORM_STATS = ('running_mean', 'running_var', 'num_batches_tracked')
EMA_KEYS = ('model_ema', 'state_dict_ema')
HEAD_POLICIES = ('reset', 'require')
STEM_WEIGHT = 'stem.0.conv.weight'


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The state dict inside a training checkpoint (``state_dict`` / ``model`` entries), ``module.`` stripped.

    A checkpoint that also holds EMA weights (``model_ema``, ``state_dict_ema``;
    the authors' DeiT-style training saves both) always gives its ``model``
    weights, the ones the authors evaluate, whichever loader reads it; the
    choice is logged.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'expected a checkpoint dict, got {type(checkpoint).__name__}')
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), Mapping):
            ema = [k for k in EMA_KEYS if isinstance(checkpoint.get(k), Mapping)]
            if ema:
                _logger.warning("checkpoint holds '%s' and '%s': loading '%s' (the EMA weights are ignored)",
                             key, ema[0], key)
            checkpoint = checkpoint[key]
            break
    return {k[7:] if k.startswith('module.') else k: v for k, v in checkpoint.items()}


def backbone_prefix(state_dict: Mapping[str, Any]) -> str:
    """Which wrapper the backbone weights sit under ('' for a classification checkpoint)."""
    if 'stem.0.conv.weight' in state_dict:
        return ''
    for prefix in BACKBONE_PREFIXES:
        if prefix + 'stem.0.conv.weight' in state_dict:
            return prefix
    raise CheckpointError(
        'no MPViT weights in this checkpoint: found no stem.0.conv.weight, bare or under any of '
        f'{", ".join(BACKBONE_PREFIXES)} ({len(state_dict)} keys: {first_few(state_dict)})')


_KINDS = {'': 'a classification checkpoint', 'backbone.bottom_up.backbone.': 'a Detectron2 checkpoint',
          'backbone.0.backbone.': 'a Deformable DETR checkpoint', 'backbone.': 'a segmentation or backbone checkpoint',
          'model.backbone.model.backbone.': 'a Deformable DETR checkpoint',
          'model.backbone.model.': 'a Deformable DETR checkpoint',
          'timm_model.': 'a transformers TimmWrapper checkpoint'}


def require_task_weights(state_dict: Mapping[str, Any], head_prefix: str, what: str, task: str) -> None:
    """Refuse to evaluate ``task`` from a checkpoint without its heads (no key starts with ``head_prefix``):
    its randomly initialised heads would give a meaningless score instead of an error."""
    if any(k.startswith(head_prefix) for k in state_dict):
        return
    try:
        kind = _KINDS[backbone_prefix(state_dict)]
    except CheckpointError:
        kind = 'a checkpoint without MPViT weights'
    raise CheckpointError(f'{what} is {kind}, with no {task} weights ({head_prefix}*): evaluating it would score '
                          f'randomly initialised heads; give a {task} checkpoint (use backbone weights to train one)')


def drop_unused_norm_stats(weights: Dict[str, Any], own: Mapping[str, Any]) -> None:
    """Remove BatchNorm statistics that ``own`` (a model's state dict) has no place for, in place: a model with
    FrozenBN (no ``num_batches_tracked``) or GroupNorm conv paths takes a BN-trained checkpoint's weights."""
    for key in [k for k in weights if k.endswith(_NORM_STATS) and k not in own]:
        del weights[key]


def check_fit(state_dict: Mapping[str, torch.Tensor], model: nn.Module, what: str = 'checkpoint', *,
              scope: str = '', shape_may_differ: Callable[[str], bool] = lambda key: False) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys (first few, with counts),
    then the first weight that is no usable weight (:func:`check_usable`).

    ``scope``: only the model's keys under this prefix must be present (a backbone-only checkpoint of a
    detector). ``shape_may_differ(key)``: keys whose shape may differ (heads reset for fine-tuning).
    """
    own = model.state_dict()
    missing = [k for k in own if k.startswith(scope) and k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [
        f'{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})'
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape) and not shape_may_differ(k)
    ]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys: {first_few(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {first_few(unexpected)}')
    if wrong_shape:
        problems.append(f'{len(wrong_shape)} keys of the wrong shape: {first_few(wrong_shape)}')
    if problems:
        target = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        raise CheckpointError(f'{what} does not fit {target}; ' + '; '.join(problems)
                              + '. Is it a checkpoint of another variant?')
    check_usable(state_dict, own, what)


_FLOAT_SLOTS = ('weight', 'bias', 'running_mean', 'running_var')


def check_usable(state_dict: Mapping[str, Any], own: Mapping[str, torch.Tensor] | nn.Module | None,
                 what: str = 'checkpoint') -> None:
    """Refuse weights a model cannot use, in one line naming the first such key: a tensor without data (meta),
    not dense, not finite, or not floating where the model's is (an int / bool tensor would be cast silently).

    ``own``: the model (or its state dict) the weights are for; ``None`` (a file converted without a model):
    keys named like parameters (``*.weight``, ``*.bias``, norm statistics) must be floating.
    """
    if isinstance(own, nn.Module):
        own = own.state_dict()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            if not hasattr(value, '__array__'):
                continue
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):
                raise CheckpointError(f'{what}: {key} is a {type(value).__name__} that is no tensor') from None
        if value.is_meta or value.layout != torch.strided:
            raise CheckpointError(f'{what}: {key} is a {"meta" if value.is_meta else str(value.layout)} tensor '
                                  f'{tuple(value.shape)} with no data to load (saved from a model not yet '
                                  'materialised?)')
        target = own.get(key) if own is not None else None
        wants_float = (target.is_floating_point() if isinstance(target, torch.Tensor)
                       else own is None and key.rsplit('.', 1)[-1] in _FLOAT_SLOTS)
        if wants_float and not value.is_floating_point():
            theirs = f'the model\'s {target.dtype}' if isinstance(target, torch.Tensor) else 'a floating-point one'
            raise CheckpointError(f'{what}: {key} is {value.dtype} where {theirs} belongs: not weights of this '
                                  'model (an integer tensor would be cast silently)')
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = (~torch.isfinite(value)).sum().item()
            raise CheckpointError(f'{what}: {key} holds {bad:,} non-finite value{"s" * (bad > 1)} (NaN or inf) of '
                                  f'{value.numel():,}: weights of a diverged or damaged run, which would predict '
                                  'nothing but NaN')


def _classes(head: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> str:
    """A classifier's class count, and its input width where the other one's class count is the same (a
    checkpoint of another variant: same classes, other width)."""
    weight, theirs = head.get('cls_head.cls.weight'), other.get('cls_head.cls.weight')
    if weight is None:
        return 'no classifier'
    if theirs is not None and weight.shape[0] == theirs.shape[0] and weight.shape[1:] != theirs.shape[1:]:
        return f'{weight.shape[0]} classes from {weight.shape[1]} features'
    return f'{weight.shape[0]} classes'


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any], model: nn.Module, head: str = 'reset') -> Dict[str, torch.Tensor]:
    """Convert a classification / Detectron2 / mmseg / Deformable DETR checkpoint for ``model``.

    Keeps only the backbone, drops BN statistics the model has no place for
    (FrozenBN / GroupNorm adapters), adapts the stem to the model's input
    channels (timm's ``adapt_input_conv``), then checks the rest fits exactly.

    ``head`` says what to do with a classifier that does not fit the model's
    (another class count, or none in the checkpoint): ``'reset'`` (fine-tuning,
    timm's ``pretrained=True``) keeps the model's fresh classifier with a
    warning; ``'require'`` (evaluation, resuming) refuses, naming both class
    counts. A classifier that fits is always loaded; a model without one
    (``num_classes=0``) ignores the checkpoint's.
    """
    return _backbone_weights(state_dict, model, head)[0]


def _backbone_weights(state_dict: Mapping[str, Any], model: nn.Module,
                      head: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """:func:`checkpoint_filter_fn`'s weights, and the keys of the model's own classifier kept in them."""
    if head not in HEAD_POLICIES:
        raise ValueError(f'head={head!r}: expected one of {HEAD_POLICIES}')
    state_dict = unwrap_checkpoint(state_dict)
    prefix = backbone_prefix(state_dict)
    # Everything outside the prefix belongs to necks / heads of other tasks.
    weights = {k[len(prefix):]: torch.as_tensor(v) for k, v in state_dict.items() if k.startswith(prefix)}

    own = model.state_dict()
    own_head = {k: v for k, v in own.items() if k.startswith('cls_head.')}
    ckpt_head = {k: weights.pop(k) for k in [k for k in weights if k.startswith('cls_head.')]}
    head_fits = set(own_head) == set(ckpt_head) and all(v.shape == own_head[k].shape for k, v in ckpt_head.items())
    if own_head and not head_fits:
        names = ", ".join(ckpt_head) or "cls_head.cls.*"
        message = (f'the checkpoint\'s classifier ({names}: {_classes(ckpt_head, own_head)}) '
                   f'does not fit the model\'s ({_classes(own_head, ckpt_head)})')
        if head == 'require':
            raise CheckpointError(message + '; evaluating or resuming needs the classifier it was trained with '
                                  "(to fine-tune, load it with head='reset': classification/main.py --pretrained)")
        _logger.warning('%s: keeping the model\'s freshly initialised classifier (fine-tuning)', message)
    weights.update(ckpt_head if head_fits else own_head)
    kept = [] if head_fits else list(own_head)

    drop_unused_norm_stats(weights, own)

    stem = weights.get(STEM_WEIGHT)
    in_chans = own[STEM_WEIGHT].shape[1] if STEM_WEIGHT in own else None
    if stem is not None and in_chans is not None and stem.ndim == 4 and stem.shape[1] != in_chans:
        from timm.models import adapt_input_conv

        weights[STEM_WEIGHT] = adapt_input_conv(in_chans, stem)
        _logger.info('adapted %s from %d to %d input channels', STEM_WEIGHT, stem.shape[1], in_chans)

    check_fit(weights, model)
    return weights, kept


def checkpoint_tensors(checkpoint: Any, what: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint (its ``model`` / ``state_dict`` entry, or the dict itself; a Caffe2
    pickle's ``blobs``) as tensors, keys unchanged: numpy arrays converted, other values left out."""
    if isinstance(checkpoint, Mapping) and 'model' not in checkpoint and isinstance(checkpoint.get('blobs'), Mapping):
        checkpoint = checkpoint['blobs']
    tensors = {}
    for key, value in unwrap_checkpoint(checkpoint).items():
        if isinstance(value, torch.Tensor) or hasattr(value, '__array__'):
            try:
                tensors[key] = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError):  # numpy data of a type torch has none for (str)
                raise CheckpointError(f'{what}: {key} is {type(value).__name__} data of a type that is no tensor '
                                      f'({getattr(value, "dtype", "?")})') from None
    if not tensors:
        raise CheckpointError(f'{what} holds no tensors')
    return tensors


def local_checkpoint(source: str) -> str:
    """A checked local checkpoint file for a path, URL or ``hf-hub:`` id (found or downloaded first,
    :func:`mpvit.weights.fetch`): for failing before any work."""
    path = fetch(source)
    ensure_checkpoint_file(path)
    return path


def read_checkpoint(source: str) -> Any:
    """Load a checkpoint from a file, URL or ``hf-hub:`` id on the CPU, never running code from it
    (:func:`mpvit.serialization.safe_load`)."""
    return safe_load(local_checkpoint(source))


def load_backbone_weights(model: nn.Module, source: str, *, checkpoint: Optional[Mapping[str, Any]] = None,
                          head: str = 'require') -> List[str]:
    """Read a checkpoint in any released format and load its backbone part into ``model`` (a classifier or
    a headless core model). Returns the keys left at their initial values.

    The task loaders share this signature (``mpvit.d2.load_detector_weights``,
    ``mpvit.mmseg.load_segmentor_weights``, ``mpvit.deformable_detr.load_detector_weights``).

    Args:
        model: the MPViT to fill.
        source: a file, URL, ``hf-hub:`` id or zoo name; names the weights in errors.
        checkpoint: the file's contents when the caller has read it already (:func:`read_checkpoint`).
        head: ``'require'`` (evaluating, resuming): the classifier must fit the model's;
            ``'reset'`` (fine-tuning): one that does not fit is left at its fresh values, with a warning
            (see :func:`checkpoint_filter_fn`).
    """
    if checkpoint is None:
        checkpoint = read_checkpoint(source)
    try:
        weights, left = _backbone_weights(checkpoint, model, head)
    except CheckpointError as e:
        raise CheckpointError(f'{source}: {e}') from None
    model.load_state_dict(weights)
    return left
