"""``MPViTCheckpointer``: Detectron2's checkpointer for every released MPViT format, with
:func:`mpvit.checkpoint.check_fit` as its one key check, reading every file (``.pth``, ``.pkl``,
``.safetensors``, its own checkpoints when resuming) without running code from it."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer

from mpvit.checkpoint import (
    HEAD_POLICIES,
    CheckpointError,
    backbone_prefix,
    check_fit,
    checkpoint_filter_fn,
    drop_unused_norm_stats,
    local_checkpoint,
    read_checkpoint,
    unwrap_checkpoint,
)
from mpvit.d2.classes import check_head_classes, check_same_classes, checkpoint_classes
from mpvit.models.mpvit import find_mpvit
from mpvit.training import LossWatch, save_atomic
from mpvit.weights import is_remote

_logger = logging.getLogger(__name__)
D2_BACKBONE_PREFIX = 'backbone.bottom_up.backbone.'


class MPViTCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads classification, mmseg and Deformable DETR checkpoints
    (their MPViT part initialises the backbone), and fails on a checkpoint that does not fit.

    A detector checkpoint must match the model key for key; the one exception is
    a head of another shape (another class count), which is skipped with
    Detectron2's usual warning so fine-tuning on a new dataset works, unless
    ``heads_must_fit`` (evaluation: a reset head would give a meaningless AP).
    A backbone-only checkpoint must fill the whole backbone.

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer``.
        heads_must_fit: refuse heads of another shape and backbone-only files (evaluation, resuming).
        dataset_meta: the class names, saved with every checkpoint (:mod:`mpvit.d2.classes`) and compared
            with a checkpoint's when ``heads_must_fit``.
    """

    def __init__(self, model: nn.Module, save_dir: str = '', *, heads_must_fit: bool = False,
                 dataset_meta: Optional[Dict[str, Any]] = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.heads_must_fit = heads_must_fit
        self.dataset_meta = dataset_meta  # saved with every checkpoint: the class names (mpvit.d2.classes)

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's save, but atomic (a new temporary file renamed over ``name.pth``: an interruption or a full
        disk never leaves a truncated checkpoint, and the latter is one line) and never of non-finite weights
        (:class:`mpvit.training.LossWatch`). Remote ``save_dir`` s (``scheme://``) go through fvcore as before."""
        if not self.save_dir or not self.save_to_disk or '://' in self.save_dir:
            extra = {'dataset_meta': self.dataset_meta} if self.dataset_meta is not None else {}
            return super().save(name, **extra, **kwargs)
        data = {'model': self.model.state_dict(), **{k: obj.state_dict() for k, obj in self.checkpointables.items()},
                **kwargs}
        if self.dataset_meta is not None:
            data['dataset_meta'] = self.dataset_meta
        LossWatch().check_weights(data['model'], f"iteration {data.get('iteration', name)}")
        path = os.path.join(self.save_dir, f'{name}.pth')
        self.logger.info('Saving checkpoint to %s', path)
        save_atomic(data, path)
        self.tag_last_checkpoint(f'{name}.pth')

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        # A URL, Hub id or zoo: word is found or downloaded once, into the weights directory (mpvit.weights),
        # not again by iopath (which knows none of the words).
        if path and is_remote(path):
            path = local_checkpoint(path)
        try:
            return super().load(path, checkpointables)
        except CheckpointError as e:
            if path and str(e).startswith(path):
                raise
            raise CheckpointError(f'{path}: {e}') from None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        return self._layout(filename, read_checkpoint(filename))

    def _layout(self, filename: str, loaded: Any) -> Dict[str, Any]:
        """What Detectron2's loader takes (``{'model': ...}`` with our markers) for a file's contents."""
        if filename.endswith('.pkl'):
            return self._pkl_layout(loaded)
        state = unwrap_checkpoint(loaded)
        if backbone_prefix(state) == D2_BACKBONE_PREFIX:
            extra = {k: v for k, v in loaded.items() if k not in ('model', 'state_dict')}
            return {**extra, 'model': dict(state)}  # copies: loading edits them, the caller's stay as they were
        # A backbone from another task: the shared extractor fits it to our core model, placed where it sits.
        where, core = find_mpvit(self.model)
        try:
            weights = checkpoint_filter_fn(state, core)
        except CheckpointError as e:
            raise CheckpointError(f'backbone weights: {e}') from None
        _logger.info('%s: MPViT weights of a non-Detectron2 checkpoint; initialising the backbone only', filename)
        return {'model': {where + k: v for k, v in weights.items()}, '__mpvit_backbone_only__': True,
                '__mpvit_core__': where}

    @staticmethod
    def _pkl_layout(data: Dict[str, Any]) -> Dict[str, Any]:
        """Detectron2's reading of a ``.pkl`` (its model zoo's, or Caffe2's ``blobs``), over data that
        :func:`mpvit.serialization.safe_load` unpickled without running code."""
        if not isinstance(data, dict):
            raise CheckpointError(f'expected a dict in the .pkl file, got {type(data).__name__}')
        if 'model' in data and '__author__' in data:
            return {**data, 'model': dict(data['model'])}
        data = data.get('blobs', data)
        return {'model': {k: v for k, v in data.items() if not k.endswith('_momentum')}, '__author__': 'Caffe2',
                'matching_heuristics': True}

    def _load_model(self, checkpoint: Dict[str, Any]):
        weights = checkpoint['model']
        drop_unused_norm_stats(weights, self.model.state_dict())
        backbone_only = checkpoint.pop('__mpvit_backbone_only__', False)
        core = checkpoint.pop('__mpvit_core__', D2_BACKBONE_PREFIX)
        if backbone_only and self.heads_must_fit:
            raise CheckpointError('the checkpoint holds MPViT backbone weights only (a classification or other-task '
                                  'checkpoint): no detector to evaluate (it can initialise the backbone for '
                                  "training: MODEL.WEIGHTS without --eval-only, or load_detector_weights(..., "
                                  "head='reset'))")
        # Fine-tuning resets heads of another shape (Detectron2 skips them with a warning); evaluation may not.
        if self.heads_must_fit:
            check_head_classes(weights, self.model, 'the checkpoint')
            theirs, ours = checkpoint_classes(checkpoint), (self.dataset_meta or {}).get('thing_classes')
            if theirs and ours:
                check_same_classes(theirs, ours, 'the checkpoint (its dataset_meta)',
                                   f"the data ({self.dataset_meta.get('dataset')})", CheckpointError)
        check_fit(weights, self.model,
                  what=f"checkpoint ({'MPViT backbone only' if backbone_only else 'detector'})",
                  scope=core if backbone_only else '',
                  shape_may_differ=lambda key: not self.heads_must_fit and not key.startswith('backbone.bottom_up.'))
        return super()._load_model(checkpoint)


def load_detector_weights(model: nn.Module, source: str, *, checkpoint: Optional[Mapping[str, Any]] = None,
                          head: str = 'require') -> List[str]:
    """Load any released checkpoint into a Detectron2 model through :class:`MPViTCheckpointer`: a detector
    key for key, or a backbone-only file (classification, mmseg, Deformable DETR) into the backbone. Returns the
    keys left at their initial values. The signature is every loader's
    (:func:`mpvit.checkpoint.load_backbone_weights`); training and resuming go through the trainer's
    checkpointer instead, as in Detectron2.

    Args:
        model: the Detectron2 model.
        source: the file, URL, ``hf-hub:`` id or zoo name; names the weights in errors.
        checkpoint: the file's contents when the caller has read it already.
        head: ``'require'`` (evaluating, predicting): the heads must fit, and a backbone-only file is refused;
            ``'reset'`` (fine-tuning): heads of another shape keep their fresh values.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f'head={head!r}: expected one of {HEAD_POLICIES}')
    checkpointer = MPViTCheckpointer(model, heads_must_fit=head == 'require')
    try:
        if checkpoint is None:
            data = checkpointer._load_file(local_checkpoint(source))
        else:
            data = checkpointer._layout(source, checkpoint)
        incompatible = checkpointer._load_model(data)
    except CheckpointError as e:
        raise CheckpointError(e if str(e).startswith(source) else f'{source}: {e}') from None
    checkpointer._log_incompatible_keys(incompatible)
    return list(incompatible.missing_keys) + [key for key, _, _ in incompatible.incorrect_shapes]
