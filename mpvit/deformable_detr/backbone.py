"""MPViT as the backbone of transformers' Deformable DETR.

Like every adapter (Detectron2's ``D2MPViT``, mmseg's ``MPViT``), the backbone
is a wrapper that *holds* the core model as ``.backbone``, so the core model's
weights sit at ``model.backbone.model.backbone.<classification key>`` in the
detector (transformers puts the backbone at ``model.backbone.model``).
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from mpvit.models.features import create_features
from mpvit.models.mpvit import MPViT

__all__ = ['BACKBONE_KEY', 'DeformableDetrMPViTBackbone', 'core_model']

# Where the core model's keys start in the detector's state dict.
BACKBONE_KEY = 'model.backbone.model.backbone.'


class DeformableDetrMPViTBackbone(nn.Module):
    """The core MPViT returning the maps at ``out_indices`` as a list, what transformers' Deformable DETR
    encoder takes.

    Takes the arguments every adapter takes (:func:`mpvit.models.create_features`), under the same names.

    Args:
        model_name: the variant (``'mpvit_small'``, timm's names) or a dict of MPViT's architecture arguments.
        out_indices: stage indices 0..3 (the recipe's ``(1, 2, 3)``: strides 8, 16, 32); ``'stem.0'`` /
            ``'stem.1'`` add the stem's stride-2 / stride-4 maps (first), for a detector with more levels.
        in_chans: input image channels.
        norm_layer: factory ``(channels) -> module`` for the conv paths' norms (``nn.BatchNorm2d``,
            ``nn.SyncBatchNorm``); BatchNorm2d by default.
        drop_path_rate: stochastic depth.
        fast_ops: ``False`` builds the textbook ops, what FLOP counting needs.
        batch_paths: ``'always'`` runs each stage's transformer paths as one batch
            (:func:`mpvit.set_batch_paths`); ``'auto'``: path by path.
    """

    def __init__(self, model_name: Union[str, Mapping[str, Any]] = 'mpvit_small',
                 out_indices: Sequence[Union[int, str]] = (1, 2, 3), *, in_chans: int = 3,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None, drop_path_rate: float = 0.,
                 fast_ops: bool = True, batch_paths: str = 'auto'):
        super().__init__()
        features = create_features(model_name, out_indices, in_chans=in_chans, norm_layer=norm_layer,
                                   drop_path_rate=drop_path_rate, fast_ops=fast_ops, batch_paths=batch_paths)
        self.backbone = features.model  # where the detector's checkpoints put the core model
        self.out_indices = features.out_indices
        self.channels: List[int] = features.feature_info.channels()  # transformers sizes its input projections by them

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.backbone.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


def core_model(detector: nn.Module) -> MPViT:
    """The core MPViT inside a detector from :func:`mpvit.deformable_detr.build_deformable_detr`."""
    return detector.model.backbone.model.backbone
