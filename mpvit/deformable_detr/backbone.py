"""MPViT as the backbone of transformers' Deformable DETR.

Like every adapter (Detectron2's ``D2MPViT``, mmseg's ``MPViT``), the backbone
is a wrapper that *holds* the core model as ``.backbone``, so the core model's
weights sit at ``model.backbone.model.backbone.<classification key>`` in the
detector (transformers puts the backbone at ``model.backbone.model``).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

from mpvit.models.mpvit import MPViT, mpvit_arch

__all__ = ['BACKBONE_KEY', 'DeformableDetrMPViTBackbone', 'core_model']

# Where the core model's keys start in the detector's state dict.
BACKBONE_KEY = 'model.backbone.model.backbone.'


class DeformableDetrMPViTBackbone(nn.Module):
    """The core MPViT (variant by timm name, ``mpvit_small``) returning the stage maps at ``out_indices`` as a
    list, what transformers' Deformable DETR encoder takes; ``'stem.0'`` / ``'stem.1'`` there add the stem's
    stride-2 / stride-4 maps (first), for a detector with more feature levels."""

    def __init__(self, name: str = 'mpvit_small', out_indices: Sequence[Union[int, str]] = (1, 2, 3),
                 drop_path_rate: float = 0., norm_layer: type = nn.BatchNorm2d):
        super().__init__()
        self.backbone = MPViT(**mpvit_arch(name), num_classes=0, global_pool='', drop_path_rate=drop_path_rate,
                              norm_layer=norm_layer)
        self.out_indices = list(out_indices)
        self.backbone.feature_levels(self.out_indices)  # an unknown level: one line naming it

    @property
    def channels(self) -> List[int]:
        """Channels of the returned maps (transformers sizes its input projections by them)."""
        return [info['num_chs'] for info in self.backbone.feature_levels(self.out_indices)]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.backbone.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


def core_model(detector: nn.Module) -> MPViT:
    """The core MPViT inside a detector from :func:`mpvit.deformable_detr.build_deformable_detr`."""
    return detector.model.backbone.model.backbone
