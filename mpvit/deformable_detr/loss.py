"""The original Deformable DETR's loss total and box-count normalisation on top of transformers' losses."""
from __future__ import annotations

import re
from typing import List, Mapping

import torch

__all__ = ['LOSS_WEIGHTS', 'global_box_normaliser', 'transformers_reduces_boxes', 'weighted_loss']

# The original recipe's loss weights, also used for the auxiliary decoder layers.
LOSS_WEIGHTS = {'loss_ce': 2, 'loss_bbox': 5, 'loss_giou': 2}


def weighted_loss(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The original total: class 2, box L1 5, GIoU 2, for the last decoder layer and each auxiliary one."""
    total = 0.
    for key, value in loss_dict.items():
        base = re.sub(r'_\d+$', '', key)
        if base in LOSS_WEIGHTS:
            total = total + LOSS_WEIGHTS[base] * value
    return total


def transformers_reduces_boxes() -> bool:
    """Whether transformers' detection loss already all-reduces the box count: it does when ``accelerate``
    (of the version transformers accepts) is importable and a ``PartialState`` exists.

    accelerate has no public, side-effect-free check of a ``PartialState`` (``PartialState().initialized``
    creates one; ``accelerate.state.is_initialized()`` looks at ``AcceleratorState``, which a bare
    ``PartialState`` leaves empty), so this mirrors transformers' own test of the class's shared state;
    ``tests/test_deformable_detr.py`` fails when transformers changes that test.
    """
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        return False
    from accelerate import PartialState

    return bool(PartialState._shared_state)


def global_box_normaliser(targets: List[Mapping[str, torch.Tensor]], device: torch.device) -> float:
    """Factor that turns transformers' losses (divided by this rank's target boxes, at least 1) into the
    original's (divided by the boxes of all ranks over the world size, at least 1).

    Every loss term that enters :func:`weighted_loss` is linear in 1 / num_boxes, so the product is exact.
    """
    local = float(sum(len(t['class_labels']) for t in targets))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or transformers_reduces_boxes():
        return 1.0
    total = torch.tensor([local], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return max(local, 1.0) / max(total.item() / torch.distributed.get_world_size(), 1.0)
