"""Detector checkpoints: the original repository's key layout, class-head size, and loading any released
format (a whole detector in our or the original layout, or backbone weights of another task)."""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from mpvit.checkpoint import (
    HEAD_POLICIES,
    CheckpointError,
    check_fit,
    checkpoint_filter_fn,
    read_checkpoint,
    unwrap_checkpoint,
)
from mpvit.deformable_detr.backbone import BACKBONE_KEY, core_model
from mpvit.errors import first_few

__all__ = ['convert_original_state_dict', 'head_classes', 'is_original_layout', 'load_detector_weights',
           'upgrade_state_dict']

_ORIGINAL_RULES: List[Tuple[str, str]] = [
    (r'^backbone\.0\.backbone\.', BACKBONE_KEY),
    (r'^input_proj\.', 'model.input_proj.'),
    (r'^query_embed\.weight$', 'model.query_position_embeddings.weight'),
    (r'^transformer\.level_embed$', 'model.level_embed'),
    (r'^transformer\.reference_points\.', 'model.reference_points.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.self_attn\.', r'model.encoder.layers.\1.self_attn.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.norm1\.', r'model.encoder.layers.\1.self_attn_layer_norm.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.linear1\.', r'model.encoder.layers.\1.mlp.fc1.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.linear2\.', r'model.encoder.layers.\1.mlp.fc2.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.norm2\.', r'model.encoder.layers.\1.final_layer_norm.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.cross_attn\.', r'model.decoder.layers.\1.encoder_attn.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm1\.', r'model.decoder.layers.\1.encoder_attn_layer_norm.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.', r'model.decoder.layers.\1.self_attn.o_proj.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm2\.', r'model.decoder.layers.\1.self_attn_layer_norm.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.linear1\.', r'model.decoder.layers.\1.mlp.fc1.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.linear2\.', r'model.decoder.layers.\1.mlp.fc2.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm3\.', r'model.decoder.layers.\1.final_layer_norm.'),
    (r'^(class_embed|bbox_embed)\.', r'\1.'),
]
_IN_PROJ = re.compile(r'^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$')
# Before the backbone became a wrapper (mpvit.deformable_detr was one module), the core model sat one level up.
_PREVIOUS_BACKBONE_KEY = 'model.backbone.model.'


def is_original_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A whole detector in the original repository's layout (its ``transformer.*`` keys; backbone weights
    alone, ``backbone.0.backbone.*``, are read as any other task's backbone)."""
    return any(k.startswith('transformer.') for k in state_dict)


def convert_original_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Original Deformable-DETR keys -> ours. Raises :class:`CheckpointError` listing keys it cannot place."""
    out: Dict[str, torch.Tensor] = {}
    unplaced = []
    for key, value in state_dict.items():
        match = _IN_PROJ.match(key)
        if match:  # nn.MultiheadAttention's packed q, k, v projection
            layer, kind = match.groups()
            for name, part in zip(('q_proj', 'k_proj', 'v_proj'), value.chunk(3, dim=0)):
                out[f'model.decoder.layers.{layer}.self_attn.{name}.{kind}'] = part.clone()
            continue
        for pattern, repl in _ORIGINAL_RULES:
            new, count = re.subn(pattern, repl, key)
            if count:
                out[new] = value
                break
        else:
            unplaced.append(key)
    if unplaced:
        raise CheckpointError(f'{len(unplaced)} keys of the original Deformable DETR layout have no place in '
                              f'this model: {first_few(unplaced)}')
    return out


def upgrade_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our checkpoints written before the backbone became a wrapper (core model at ``model.backbone.model.``)
    -> the current layout; current ones unchanged."""
    if any(k.startswith(BACKBONE_KEY) for k in state_dict):
        return dict(state_dict)
    return {BACKBONE_KEY + k[len(_PREVIOUS_BACKBONE_KEY):] if k.startswith(_PREVIOUS_BACKBONE_KEY) else k: v
            for k, v in state_dict.items()}


def head_classes(checkpoint: Mapping) -> Optional[int]:
    """The outputs of a detector checkpoint's class head (our or the original layout; ``None`` without one):
    the class count it was trained with, known before any model is built."""
    state = unwrap_checkpoint(checkpoint)
    for key in ('class_embed.0.bias', 'class_embed.bias'):
        if key in state and hasattr(state[key], 'shape'):
            return int(state[key].shape[0])
    return None


def _is_detector(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(('model.', 'class_embed.', 'bbox_embed.')) for k in state)


def load_detector_weights(model: nn.Module, source: str, *, checkpoint: Optional[Mapping] = None,
                          head: str = 'require') -> List[str]:
    """Load a detector checkpoint in our or the original layout; a backbone-only one (classification or
    another task's) fills the backbone through the extractor every adapter shares
    (:func:`mpvit.checkpoint.checkpoint_filter_fn`). Returns the keys left at their initial values.
    The signature is every loader's (:func:`mpvit.checkpoint.load_backbone_weights`).

    Args:
        model: the detector (:func:`mpvit.deformable_detr.build_deformable_detr`).
        source: the file, URL, ``hf-hub:`` id or zoo name; names the weights in errors.
        checkpoint: the file's contents when the caller has read it already.
        head: ``'require'`` (evaluating, resuming): a whole detector that fits; ``'reset'`` (fine-tuning on
            other classes): a class head of another size is not loaded, so the model keeps its fresh one, and a
            backbone-only file initialises the backbone.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f'head={head!r}: expected one of {HEAD_POLICIES}')
    if checkpoint is None:
        checkpoint = read_checkpoint(source)
    state = unwrap_checkpoint(checkpoint)
    own = model.state_dict()
    if is_original_layout(state):
        state = convert_original_state_dict(state)
    elif _is_detector(state):
        state = upgrade_state_dict(state)
    else:  # a classification / Detectron2 / mmseg / DETR-backbone / TimmWrapper checkpoint: backbone only
        if head == 'require':
            raise CheckpointError(f'{source} holds MPViT backbone weights only (a classification or other-task '
                                  "checkpoint): no detector to evaluate; head='reset' initialises the backbone "
                                  'from it')
        core = core_model(model)
        try:
            weights = checkpoint_filter_fn(state, core)
        except CheckpointError as e:
            raise CheckpointError(f'{source}: backbone weights: {e}') from None
        core.load_state_dict(weights)
        return [k for k in own if not k.startswith(BACKBONE_KEY)]
    # names missing, unexpected and mis-shaped keys, then weights that are none
    check_fit(state, model, what=source, shape_may_differ=lambda k: head == 'reset' and k.startswith('class_embed.'))
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return missing
