"""MPViT as a Detectron2 backbone (RetinaNet, Mask R-CNN, Cascade Mask R-CNN).

Importing this module registers three builders with ``BACKBONE_REGISTRY``:

* ``build_mpvit_backbone``: the bare backbone (stage2..stage5, strides 4..32);
* ``build_mpvit_fpn_backbone``: FPN + LastLevelMaxPool (Mask R-CNN, Cascade);
* ``build_retinanet_mpvit_fpn_backbone``: FPN + P6/P7 computed from stage5 (C5).

Module nesting follows the released checkpoints: the FPN's ``bottom_up`` is
:class:`D2MPViT`, whose ``backbone`` is the core model, so its weights sit at
``backbone.bottom_up.backbone.<classification key>``.

:class:`MPViTCheckpointer` reads ``MODEL.WEIGHTS`` in any released format (a
classification checkpoint initialises the backbone only) and refuses a
checkpoint that does not fit, naming the missing and unexpected keys.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from typing import Any, Dict, List, Optional, Type

import torch
import torch.nn as nn
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from mpvit.checkpoint import CheckpointError, backbone_prefix, read_checkpoint, unwrap_checkpoint
from mpvit.models.mpvit import MPViT, mpvit_arch

__all__ = [
    'D2MPViT', 'MPViTCheckpointer', 'add_mpvit_config', 'build_mpvit_backbone', 'build_mpvit_fpn_backbone',
    'build_retinanet_mpvit_fpn_backbone', 'build_detr_augmentation', 'build_optimizer', 'build_train_mapper',
    'register_coco_datasets',
]

_logger = logging.getLogger(__name__)
STAGE_NAMES = ('stage2', 'stage3', 'stage4', 'stage5')
D2_BACKBONE_PREFIX = 'backbone.bottom_up.backbone.'
_NORM_STATS = ('running_mean', 'running_var', 'num_batches_tracked')


def add_mpvit_config(cfg: CfgNode) -> None:
    """Add the keys our configs use to a Detectron2 config (call before ``merge_from_file``)."""
    cfg.MODEL.MPVIT = CfgNode()
    cfg.MODEL.MPVIT.NAME = 'mpvit_small'  # mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base
    cfg.MODEL.MPVIT.OUT_FEATURES = list(STAGE_NAMES)
    cfg.MODEL.MPVIT.NORM = 'SyncBN'  # BN | SyncBN | FrozenBN | GN
    cfg.MODEL.MPVIT.DROP_PATH = 0.2
    cfg.SOLVER.OPTIMIZER = 'AdamW'  # AdamW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # lr factor of every parameter under model.backbone
    cfg.AUG = CfgNode()
    cfg.AUG.DETR = False  # DETR-style multi-scale + random-crop training augmentation
    # After a crop, boxes are clipped to it (the authors' mapper); True recomputes them from the cropped masks.
    cfg.AUG.RECOMPUTE_BOXES = False


def norm_factory(norm: str):
    """Detectron2's norm names for the conv paths of MPViT.

    GN uses gcd(32, channels) groups: MPViT widths such as 216 or 368 are not
    multiples of Detectron2's fixed 32 groups.
    """
    if norm == 'GN':
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    if norm not in ('BN', 'SyncBN', 'FrozenBN', 'nnSyncBN', 'naiveSyncBN'):
        raise ValueError(f"MODEL.MPVIT.NORM {norm!r} is not one of 'BN', 'SyncBN', 'FrozenBN', 'GN'")
    return lambda channels: get_norm(norm, channels)


class D2MPViT(Backbone):
    """The core MPViT model as a Detectron2 ``Backbone`` returning ``out_features`` of stage2..stage5."""

    def __init__(
            self,
            name: str = 'mpvit_small',
            out_features: Optional[List[str]] = None,
            norm: str = 'BN',
            drop_path_rate: float = 0.,
            in_channels: int = 3,
    ):
        super().__init__()
        out_features = list(out_features or STAGE_NAMES)
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f'MODEL.MPVIT.OUT_FEATURES {out_features} must name some of {list(STAGE_NAMES)}')
        try:
            arch = mpvit_arch(name)
        except ValueError as e:
            raise ValueError(f'MODEL.MPVIT.NAME {e}') from None
        self.backbone = MPViT(
            **arch, in_chans=in_channels, num_classes=0, global_pool='',
            drop_path_rate=drop_path_rate, norm_layer=norm_factory(norm),
        )
        info = {STAGE_NAMES[i]: f for i, f in enumerate(self.backbone.feature_info)}
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_strides = {f: info[f]['reduction'] for f in self._out_features}
        self._out_feature_channels = {f: info[f]['num_chs'] for f in self._out_features}
        self._indices = [STAGE_NAMES.index(f) for f in self._out_features]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f'D2MPViT takes a (N, C, H, W) tensor, got shape {tuple(x.shape)}')
        maps = self.backbone.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        return dict(zip(self._out_features, maps))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
            for f in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32


def _check_fpn_features(cfg: CfgNode, bottom_up: D2MPViT) -> List[str]:
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    missing = [f for f in in_features if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(f'MODEL.FPN.IN_FEATURES {in_features} needs {missing}, which MODEL.MPVIT.OUT_FEATURES '
                         f'{list(cfg.MODEL.MPVIT.OUT_FEATURES)} does not produce')
    return in_features


@BACKBONE_REGISTRY.register()
def build_mpvit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2MPViT:
    return D2MPViT(
        name=cfg.MODEL.MPVIT.NAME, out_features=list(cfg.MODEL.MPVIT.OUT_FEATURES), norm=cfg.MODEL.MPVIT.NORM,
        drop_path_rate=cfg.MODEL.MPVIT.DROP_PATH, in_channels=input_shape.channels,
    )


@BACKBONE_REGISTRY.register()
def build_mpvit_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MPViT + FPN with a max-pooled extra level (P2..P6), as in Mask R-CNN."""
    bottom_up = build_mpvit_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up, in_features=_check_fpn_features(cfg, bottom_up), out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_mpvit_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MPViT + FPN (P3..P5) with P6/P7 convolved from the backbone's stage5 output (C5), as in RetinaNet."""
    bottom_up = build_mpvit_backbone(cfg, input_shape)
    in_features = _check_fpn_features(cfg, bottom_up)
    last = in_features[-1]
    return FPN(
        bottom_up=bottom_up, in_features=in_features, out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()[last].channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature=last),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def build_detr_augmentation(cfg: CfgNode) -> List[T.Augmentation]:
    """DETR's training augmentation: flip, then either a multi-scale resize, or (half of the time)
    a resize to 400/500/600, a random crop of ``INPUT.CROP.SIZE`` and the multi-scale resize."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    crop = T.AugmentationList([
        T.ResizeShortestEdge([400, 500, 600], sample_style='choice'),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
    ])
    flip = T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == 'horizontal', vertical=cfg.INPUT.RANDOM_FLIP == 'vertical')
    return [flip, T.RandomApply(crop, prob=0.5), resize]


def build_train_mapper(cfg: CfgNode) -> Optional[DatasetMapper]:
    """The training mapper: ``None`` (Detectron2's default) unless ``AUG.DETR`` asks for DETR's augmentation."""
    if not cfg.AUG.DETR:
        return None
    logging.getLogger('detectron2.mpvit').info(
        'AUG.DETR: flip, then multi-scale resize %s (max %d), or with p=0.5 resize to 400/500/600 + %s crop %s '
        'first; boxes %s', tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.CROP.TYPE,
        tuple(cfg.INPUT.CROP.SIZE), 'recomputed from masks' if cfg.AUG.RECOMPUTE_BOXES else 'clipped to the crop')
    return DatasetMapper(cfg, is_train=True, augmentations=build_detr_augmentation(cfg),
                         recompute_boxes=cfg.MODEL.MASK_ON and cfg.AUG.RECOMPUTE_BOXES)


def _with_full_model_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float):
    """An optimizer class that clips the gradient norm over all parameters together before each step."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(group['params'] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f'{optimizer_cls.__name__}FullModelGradientClipping'
    return FullModelGradientClipping


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The reference's optimizer: one weight decay for all parameters, the backbone's lr scaled by
    ``SOLVER.BACKBONE_MULTIPLIER``, and (``CLIP_TYPE: full_model``) clipping of the global grad norm.

    Parameters are grouped by (lr, weight decay); shared parameters (the aliased
    CPE/CRPE modules) are counted once.
    """
    from detectron2.solver.build import maybe_add_gradient_clipping

    groups: Dict[float, List[nn.Parameter]] = {}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr = cfg.SOLVER.BASE_LR * (cfg.SOLVER.BACKBONE_MULTIPLIER if 'backbone' in name else 1.0)
        groups.setdefault(lr, []).append(param)
    param_groups = [dict(params=p, lr=lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY) for lr, p in groups.items()]

    name = cfg.SOLVER.OPTIMIZER
    if name == 'AdamW':
        optimizer_cls, kwargs = torch.optim.AdamW, dict(lr=cfg.SOLVER.BASE_LR)
    elif name == 'SGD':
        optimizer_cls, kwargs = torch.optim.SGD, dict(lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
                                                      nesterov=cfg.SOLVER.NESTEROV)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER {name!r} is not 'AdamW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == 'full_model':
        return _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)(param_groups, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_cls)(param_groups, **kwargs)


def register_coco_datasets(specs: Optional[List[List[str]]]) -> None:
    """Register ``[NAME, JSON, IMAGE_DIR]`` COCO-format datasets (``--coco-dataset``), checking the paths exist."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in specs or []:
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(f'--coco-dataset {name}: {path} does not exist')
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)


def _format_keys(keys: List[str], show: int = 5) -> str:
    more = f', ... (+{len(keys) - show} more)' if len(keys) > show else ''
    return ', '.join(keys[:show]) + more


class MPViTCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads classification, mmseg and Deformable DETR checkpoints
    (their MPViT part initialises the backbone), and fails on a checkpoint that does not fit.

    A detector checkpoint must match the model key for key; the one exception is
    a head of another shape (another class count), which is skipped with
    Detectron2's usual warning so fine-tuning on a new dataset works, unless
    ``heads_must_fit`` (evaluation: a reset head would give a meaningless AP).
    A backbone-only checkpoint must fill the whole backbone.
    """

    def __init__(self, model: nn.Module, save_dir: str = '', *, heads_must_fit: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.heads_must_fit = heads_must_fit

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if filename.endswith('.pkl'):
            return super()._load_file(filename)
        loaded = read_checkpoint(filename)
        state = unwrap_checkpoint(loaded)
        prefix = backbone_prefix(state)
        if prefix == D2_BACKBONE_PREFIX:
            extra = {k: v for k, v in loaded.items() if k not in ('model', 'state_dict')}
            return {**extra, 'model': state}
        # A backbone from another task: place it where Detectron2 keeps it; drop everything else.
        weights = {D2_BACKBONE_PREFIX + k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith('cls_head.')}
        _logger.info('%s: MPViT weights of a non-Detectron2 checkpoint (prefix %r); initialising the backbone only',
                     filename, prefix)
        return {'model': weights, '__mpvit_backbone_only__': True}

    def _load_model(self, checkpoint: Dict[str, Any]):
        weights = checkpoint['model']
        own = self.model.state_dict()
        for k in [k for k in weights if k.endswith(_NORM_STATS) and k not in own]:
            del weights[k]  # FrozenBN / GroupNorm have no place for BN statistics
        backbone_only = checkpoint.pop('__mpvit_backbone_only__', False)
        if backbone_only and self.heads_must_fit:
            raise CheckpointError('the checkpoint holds MPViT backbone weights only (a classification or other-task '
                                  'checkpoint): no detector to evaluate')
        scope = D2_BACKBONE_PREFIX if backbone_only else ''
        missing = [k for k in own if k.startswith(scope) and k not in weights]
        unexpected = [k for k in weights if k not in own]
        wrong = [k for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        wrong_backbone = [f'{k} (checkpoint {tuple(weights[k].shape)}, model {tuple(own[k].shape)})'
                          for k in wrong if k.startswith('backbone.bottom_up.') or self.heads_must_fit]
        kind = 'keys of the wrong shape' if self.heads_must_fit else 'backbone keys of the wrong shape'
        problems = [f'{len(v)} {what}: {_format_keys(v)}' for what, v in (
            ('missing keys', missing), ('unexpected keys', unexpected), (kind, wrong_backbone)) if v]
        if problems:
            raise CheckpointError(
                f"checkpoint does not fit this model ({self.model.__class__.__name__} with MPViT "
                f"{'backbone only' if backbone_only else 'detector'}); " + '; '.join(problems)
                + '. Is it a checkpoint of another variant or detector?')
        return super()._load_model(checkpoint)

