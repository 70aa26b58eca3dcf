"""MPViT as a Detectron2 ``Backbone`` and the three builders registered with ``BACKBONE_REGISTRY``.

* ``build_mpvit_backbone``: the bare backbone (stage2..stage5, strides 4..32; also ``stage1``, the stride-2
  map of the stem's first conv, and ``stem``, the stem's stride-4 output);
* ``build_mpvit_fpn_backbone``: FPN + LastLevelMaxPool (Mask R-CNN, Cascade);
* ``build_retinanet_mpvit_fpn_backbone``: FPN + P6/P7 computed from stage5 (C5).

Module nesting follows the released checkpoints: the FPN's ``bottom_up`` is
:class:`D2MPViT`, whose ``backbone`` is the core model, so its weights sit at
``backbone.bottom_up.backbone.<classification key>``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from mpvit.d2.config import FEATURE_NAMES, STAGE_NAMES
from mpvit.errors import InvalidInputError
from mpvit.models.batched_paths import set_batch_paths
from mpvit.models.mpvit import STEM_LEVELS, MPViT, mpvit_arch


def norm_factory(norm: str):
    """Detectron2's norm names for the conv paths of MPViT.

    GN uses gcd(32, channels) groups: MPViT widths such as 216 or 368 are not
    multiples of Detectron2's fixed 32 groups.
    """
    if norm == 'GN':
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    if norm not in ('BN', 'SyncBN', 'FrozenBN', 'nnSyncBN', 'naiveSyncBN'):
        raise InvalidInputError(f"MODEL.MPVIT.NORM {norm!r} is not one of 'BN', 'SyncBN', 'FrozenBN', 'GN'")
    return lambda channels: get_norm(norm, channels)


_LEVELS = dict(zip(FEATURE_NAMES, STEM_LEVELS + (0, 1, 2, 3)))


class D2MPViT(Backbone):
    """The core MPViT model as a Detectron2 ``Backbone`` returning ``out_features`` of stage2..stage5
    (and of ``stage1`` / ``stem``, the stem's stride-2 / stride-4 maps, when named)."""

    def __init__(
            self,
            name: str = 'mpvit_small',
            out_features: Optional[List[str]] = None,
            norm: str = 'BN',
            drop_path_rate: float = 0.,
            in_channels: int = 3,
            fast_ops: bool = True,
            batch_paths: str = 'auto',
    ):
        super().__init__()
        out_features = list(out_features or STAGE_NAMES)
        unknown = [f for f in out_features if f not in FEATURE_NAMES]
        if unknown or not out_features:
            raise InvalidInputError(f'MODEL.MPVIT.OUT_FEATURES {out_features} must name some of {list(FEATURE_NAMES)}')
        try:
            arch = mpvit_arch(name)
        except ValueError as e:
            raise InvalidInputError(f'MODEL.MPVIT.NAME {e}') from None
        self.backbone = MPViT(
            **arch, in_chans=in_channels, num_classes=0, global_pool='',
            drop_path_rate=drop_path_rate, norm_layer=norm_factory(norm), fast_ops=fast_ops,
        )
        set_batch_paths(self.backbone, batch_paths)
        self._out_features = [f for f in FEATURE_NAMES if f in out_features]
        # The core model's levels: the stem maps by name, the stages by index (the order it returns them in).
        self._indices = [_LEVELS[f] for f in self._out_features]
        info = dict(zip(self._out_features, self.backbone.feature_levels(self._indices)))
        self._out_feature_strides = {f: info[f]['reduction'] for f in self._out_features}
        self._out_feature_channels = {f: info[f]['num_chs'] for f in self._out_features}

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
        raise InvalidInputError(f'MODEL.FPN.IN_FEATURES {in_features} needs {missing}, which MODEL.MPVIT.OUT_FEATURES '
                                f'{list(cfg.MODEL.MPVIT.OUT_FEATURES)} does not produce')
    return in_features


@BACKBONE_REGISTRY.register()
def build_mpvit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2MPViT:
    return D2MPViT(
        name=cfg.MODEL.MPVIT.NAME, out_features=list(cfg.MODEL.MPVIT.OUT_FEATURES), norm=cfg.MODEL.MPVIT.NORM,
        drop_path_rate=cfg.MODEL.MPVIT.DROP_PATH, in_channels=input_shape.channels, fast_ops=cfg.MODEL.MPVIT.FAST_OPS,
        batch_paths=cfg.MODEL.MPVIT.BATCH_PATHS,
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
