"""The authors' optimizer for MPViT detectors (AdamW or SGD, backbone lr multiplier, full-model clipping)."""
from __future__ import annotations

import itertools
from typing import Dict, List, Type

import torch
import torch.nn as nn
from detectron2.config import CfgNode

from mpvit.errors import InvalidInputError


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
        raise InvalidInputError(f"SOLVER.OPTIMIZER {name!r} is not 'AdamW' or 'SGD'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == 'full_model':
        return _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)(param_groups, **kwargs)
    return maybe_add_gradient_clipping(cfg, optimizer_cls)(param_groups, **kwargs)
