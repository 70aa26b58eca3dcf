"""The original Deformable DETR's optimizer parameter groups."""
from __future__ import annotations

from typing import Dict, List

import torch.nn as nn

from mpvit.deformable_detr.backbone import core_model

__all__ = ['LINEAR_PROJ_NAMES', 'param_groups']

# Parameters trained at lr * lr_linear_proj_mult in the original.
LINEAR_PROJ_NAMES = ('reference_points', 'sampling_offsets')


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1) -> List[Dict]:
    """The original's three groups: the rest, the backbone, sampling-offset / reference-point projections."""
    in_backbone = {id(p) for p in core_model(model).parameters()}
    groups: Dict[str, list] = {'backbone': [], 'linear_proj': [], 'rest': []}
    for name, p in model.named_parameters():  # shared heads are yielded once
        if not p.requires_grad:
            continue
        if id(p) in in_backbone:
            groups['backbone'].append(p)
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            groups['linear_proj'].append(p)
        else:
            groups['rest'].append(p)
    return [dict(params=groups['rest'], lr=lr), dict(params=groups['backbone'], lr=lr_backbone),
            dict(params=groups['linear_proj'], lr=lr * lr_linear_proj_mult)]
