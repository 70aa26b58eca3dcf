"""Checkpoints in mmengine: every read without running code, and the one way a segmentor takes its weights.

Importing this module makes mmengine read every checkpoint (``load_from``, ``--resume``, ``init_cfg`` of any
module; local files, URLs, and its ``torchvision://`` / ``open-mmlab://`` / ``s3://`` ... schemes) without
running code from it: local files and URLs through :func:`mpvit.checkpoint.read_checkpoint` (URLs found in the
weights directory first), and mmengine's two readers underneath its other schemes replaced by safe ones.
mmengine's own reader falls back to full unpickling when its allowlist refuses a file.
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Optional

import mmengine
import mmengine.runner.checkpoint as mmengine_checkpoint
import torch
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import apply_to

from mpvit.checkpoint import (
    HEAD_POLICIES,
    CheckpointError,
    check_fit,
    checkpoint_filter_fn,
    read_checkpoint,
    require_task_weights,
    unwrap_checkpoint,
)
from mpvit.models.mpvit import find_mpvit
from mpvit.serialization import safe_load_stream

__all__ = ['last_read', 'load_segmentor_weights']

_LAST_READ = ['']


def last_read() -> str:
    """The checkpoint mmengine read last through this module (for messages of the hooks that check it)."""
    return _LAST_READ[0]


def _read(source: str, map_location: Any) -> Any:
    checkpoint = _on_device(read_checkpoint(source), map_location)
    _LAST_READ[0] = source
    return checkpoint


def _on_device(checkpoint: Any, map_location: Any) -> Any:
    """Tensors read on the CPU, moved to ``map_location`` if it names a device (a callable one is left to
    mmengine's own moves)."""
    if isinstance(map_location, (str, torch.device)) and str(map_location) != 'cpu':
        checkpoint = apply_to(checkpoint, lambda x: isinstance(x, torch.Tensor), lambda t: t.to(map_location))
    return checkpoint


def _load_without_code(filename: str, map_location: Any = None) -> Any:
    """mmengine's checkpoint loader for local files, URLs and ``hf-hub:`` ids."""
    return _read(filename, map_location)


def _safe_torch_load(file: Any, map_location: Any = None, weights_only: Any = None) -> Any:
    """Stands in for mmengine's ``_safe_torch_load`` (which falls back to full unpickling) under its
    other schemes: a path as any checkpoint here, a stream (s3, petrel) by the same allowlist."""
    if isinstance(file, (str, os.PathLike)):
        return _read(os.fspath(file), map_location)
    _LAST_READ[0] = 'the checkpoint stream'
    return _on_device(safe_load_stream(file), map_location)


def _load_url(url: str, model_dir: Any = None, map_location: Any = None, progress: bool = True,
              check_hash: bool = False, file_name: Any = None) -> Any:
    """Stands in for mmengine's ``load_url`` (torch.hub's, full unpickling) under ``torchvision://``,
    ``open-mmlab://``, ``mmcls://`` ...: the URL is found or downloaded as every other one."""
    return _read(url, map_location)


def _make_mmengine_safe() -> None:
    for name, safe in (('_safe_torch_load', _safe_torch_load), ('load_url', _load_url)):
        if not callable(getattr(mmengine_checkpoint, name, None)):  # fail loudly if mmengine changes
            raise ImportError(f'mmengine {mmengine.__version__} has no mmengine.runner.checkpoint.{name}: '
                              'mpvit.mmseg cannot make its checkpoint reading safe; use the mmengine version '
                              'of requirements.txt')
        setattr(mmengine_checkpoint, name, safe)
    CheckpointLoader.register_scheme(prefixes=('', 'http://', 'https://', 'hf-hub:'), loader=_load_without_code,
                                     force=True)


_make_mmengine_safe()


_CLASS_LAYERS = ('decode_head.conv_seg.', 'auxiliary_head.conv_seg.')


def load_segmentor_weights(model: torch.nn.Module, source: str, *, checkpoint: Optional[Mapping[str, Any]] = None,
                           head: str = 'require') -> List[str]:
    """Load a whole segmentor's weights (evaluation, the demo), strictly: a file without a decode head (a
    backbone-only or classification checkpoint) or one that does not fit ``model`` (another variant or class
    count) is refused in one line naming ``source``, where mmengine's non-strict load would leave those parts
    randomly initialised and a wrong mIoU or picture would follow. Returns the keys left at their initial
    values. The signature is every loader's (:func:`mpvit.checkpoint.load_backbone_weights`).

    Args:
        model: the segmentor.
        source: the file, URL, ``hf-hub:`` id or zoo name; names the weights in errors.
        checkpoint: the file's contents when the caller has read it already (it also takes the class names
            from its ``meta``).
        head: ``'require'`` (evaluating): a whole segmentor that fits; ``'reset'`` (fine-tuning on other
            classes): class layers of another shape keep their fresh values, and a backbone-only file
            (classification, detection) initialises the backbone.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f'head={head!r}: expected one of {HEAD_POLICIES}')
    if checkpoint is None:
        checkpoint = read_checkpoint(source)
    state = unwrap_checkpoint(checkpoint)
    own = model.state_dict()
    if head == 'reset' and not any(k.startswith('decode_head.') for k in state):
        _, core = find_mpvit(model)
        try:
            core.load_state_dict(checkpoint_filter_fn(state, core))
        except CheckpointError as e:
            raise CheckpointError(f'{source}: backbone weights: {e}') from None
        return [k for k in own if not k.startswith('backbone.')]  # the backbone's keys are the core's, flat
    require_task_weights(state, 'decode_head.', source, 'segmentor')
    check_fit(state, model, what=source,
              shape_may_differ=lambda key: head == 'reset' and key.startswith(_CLASS_LAYERS))
    left = [k for k in own if k not in state or state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k not in left}, strict=not left)
    return left
