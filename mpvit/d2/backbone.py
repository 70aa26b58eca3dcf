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
from typing import Any, Callable, Dict, List, Mapping, Sequence, Union

import torch
import torch.nn as nn
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from mpvit.d2.config import FEATURE_NAMES, STAGE_NAMES
from mpvit.errors import InvalidInputError
from mpvit.models.features import create_features, resolve_arch
from mpvit.models.mpvit import STEM_LEVELS


def norm_factory(norm: str, option: str = 'MODEL.MPVIT.NORM') -> Callable[[int], nn.Module]:
    """Detectron2's norm names for the conv paths of MPViT (``option`` names the setting in errors).

    GN uses gcd(32, channels) groups: MPViT widths such as 216 or 368 are not
    multiples of Detectron2's fixed 32 groups.
    """
    if norm == 'GN':
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    if norm not in ('BN', 'SyncBN', 'FrozenBN', 'nnSyncBN', 'naiveSyncBN'):
        raise InvalidInputError(f"{option} {norm!r} is not one of 'BN', 'SyncBN', 'FrozenBN', 'GN'")
    return lambda channels: get_norm(norm, channels)


_LEVELS = dict(zip(FEATURE_NAMES, STEM_LEVELS + (0, 1, 2, 3)))
_NAMES = {level: name for name, level in _LEVELS.items()}


class D2MPViT(Backbone):
    """The core MPViT as a Detectron2 ``Backbone``: a dict of the maps at ``out_indices`` under
    Detectron2's names (``stage2`` .. ``stage5``, strides 4..32; ``stage1`` / ``stem``, the stem's
    stride-2 / stride-4 maps).

    Takes the arguments every adapter takes (:func:`mpvit.models.create_features`), under the same names.

    Args:
        model_name: the variant (``'mpvit_small'``, timm's names) or a dict of MPViT's architecture arguments.
        out_indices: the levels, by Detectron2's names (as ``MODEL.MPVIT.OUT_FEATURES``) or by the core
            model's (stage indices 0..3, ``'stem.0'``, ``'stem.1'``).
        in_chans: input image channels.
        norm_layer: Detectron2's norm name for the conv paths, ``'BN'`` | ``'SyncBN'`` | ``'FrozenBN'`` |
            ``'GN'`` (:func:`norm_factory`), or a factory ``(channels) -> module``.
        drop_path_rate: stochastic depth.
        fast_ops: ``False`` builds the textbook ops, what FLOP counting needs.
        batch_paths: ``'always'`` runs each stage's transformer paths as one batch
            (:func:`mpvit.set_batch_paths`); ``'auto'``: path by path.
    """

    def __init__(
            self,
            model_name: Union[str, Mapping[str, Any]] = 'mpvit_small',
            out_indices: Union[int, Sequence[Union[int, str]]] = STAGE_NAMES,
            *,
            in_chans: int = 3,
            norm_layer: Union[str, Callable[[int], nn.Module]] = 'BN',
            drop_path_rate: float = 0.,
            fast_ops: bool = True,
            batch_paths: str = 'auto',
    ):
        super().__init__()
        if isinstance(out_indices, int):  # timm's last-n
            levels = out_indices
        else:
            unknown = [v for v in out_indices if isinstance(v, str) and v not in _LEVELS and v not in STEM_LEVELS]
            if unknown:
                raise InvalidInputError(f'D2MPViT out_indices {unknown[0]!r}: levels are named {", ".join(_LEVELS)}, '
                                        f'or stage indices 0..3 and {", ".join(STEM_LEVELS)}')
            levels = [_LEVELS.get(level, level) for level in out_indices]
        features = create_features(
            model_name, levels, in_chans=in_chans, drop_path_rate=drop_path_rate, fast_ops=fast_ops,
            norm_layer=norm_factory(norm_layer, 'D2MPViT norm_layer') if isinstance(norm_layer, str) else norm_layer,
            batch_paths=batch_paths,
        )
        self.backbone = features.model  # where the released checkpoints put the core model
        self._indices = features.out_indices
        self._out_features = [_NAMES[level] for level in self._indices]
        self._out_feature_strides = dict(zip(self._out_features, features.feature_info.reduction()))
        self._out_feature_channels = dict(zip(self._out_features, features.feature_info.channels()))

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
    """The bare backbone from ``MODEL.MPVIT`` (errors name its keys)."""
    mp = cfg.MODEL.MPVIT
    out_features = list(mp.OUT_FEATURES)
    unknown = [f for f in out_features if f not in FEATURE_NAMES]
    if unknown or not out_features:
        raise InvalidInputError(f'MODEL.MPVIT.OUT_FEATURES {out_features} must name some of {list(FEATURE_NAMES)}')
    return D2MPViT(
        resolve_arch(mp.NAME, option='MODEL.MPVIT.NAME'), out_features, in_chans=input_shape.channels,
        norm_layer=norm_factory(mp.NORM), drop_path_rate=mp.DROP_PATH, fast_ops=mp.FAST_OPS,
        batch_paths=mp.BATCH_PATHS,
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
