"""Deformable DETR with an MPViT backbone, on Hugging Face ``transformers`` (no custom CUDA build).

``transformers``' ``DeformableDetrForObjectDetection`` runs the multi-scale
deformable attention in pure PyTorch. Its defaults differ from the original
recipe (Zhu et al.; MPViT's released model is the plain variant: no box
refinement, no two-stage), so :func:`build_deformable_detr` sets them back:

* the backbone is the core MPViT with *trainable* (Sync)BN, as in the reference
  (transformers would freeze every BatchNorm of a backbone it builds);
* classification and box heads are one module shared by all decoder layers
  (the original's ``nn.ModuleList([head] * 6)``), with ``tie_word_embeddings``
  off so that transformers does not tie anything on its own;
* head initialisation of the original (focal prior 0.01 on the class bias, last
  box layer zero with bias[2:] = -2, xavier input projections and transformer);
* dropout 0.1 where the original has it: attention outputs, the FFN activation
  and output, the decoder self-attention weights; none on the encoder input
  (transformers would add one there and leave activation / attention dropout 0);
* query embeddings drawn from N(0, 1) as ``nn.Embedding``'s default in the
  original (transformers' N(0, 0.02) starts every reference point near the
  image centre);
* matcher costs class 2 / box 5 / GIoU 2, and :func:`weighted_loss` applies the
  original loss weights (transformers hard-codes class weight 1);
* :func:`global_box_normaliser` rescales the losses to the number of target
  boxes averaged over all ranks, as the original all-reduces it
  (transformers does so only under ``accelerate``).

:func:`convert_original_state_dict` maps the original repository's key layout
(``backbone.0.backbone.*``, ``transformer.*``, ``query_embed``) onto this model.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, TimmBackboneConfig

from mpvit.checkpoint import CheckpointError, backbone_prefix, check_fit, unwrap_checkpoint
from mpvit.models.mpvit import MPViT, mpvit_arch

__all__ = [
    'DeformableDetrMPViTBackbone', 'build_deformable_detr', 'convert_original_state_dict', 'load_detector_weights',
    'weighted_loss', 'global_box_normaliser', 'param_groups', 'LOSS_WEIGHTS', 'head_classes',
]

# The original recipe: loss weights (also used for the auxiliary decoder layers) and matcher costs.
LOSS_WEIGHTS = {'loss_ce': 2, 'loss_bbox': 5, 'loss_giou': 2}
MATCHER_COSTS = dict(class_cost=2, bbox_cost=5, giou_cost=2)
BACKBONE_KEY = 'model.backbone.model.'
LINEAR_PROJ_NAMES = ('reference_points', 'sampling_offsets')
DROPOUT = 0.1


class DeformableDetrMPViTBackbone(MPViT):
    """The core model returning the stage maps at ``out_indices`` as a list (what transformers' encoder takes)."""

    def __init__(self, arch: str = 'small', out_indices: Tuple[int, ...] = (1, 2, 3), drop_path_rate: float = 0.,
                 norm_layer=nn.BatchNorm2d):
        super().__init__(**mpvit_arch(arch), num_classes=0, global_pool='', drop_path_rate=drop_path_rate,
                         norm_layer=norm_layer)
        self.out_indices = list(out_indices)

    @property
    def channels(self) -> List[int]:
        return [self.feature_info[i]['num_chs'] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


def build_deformable_detr(
        backbone: str = 'mpvit_small',
        num_labels: int = 91,
        num_queries: int = 300,
        num_feature_levels: int = 4,
        drop_path_rate: float = 0.,
        sync_bn: bool = False,
) -> DeformableDetrForObjectDetection:
    """Plain Deformable DETR (stages 3-5 + one extra level) with the original recipe's settings."""
    import mpvit.models  # noqa: F401  (registers the timm models the backbone config names)

    mpvit_arch(backbone)  # a clear error for anything but an MPViT variant
    arch = backbone.removeprefix('mpvit_')
    config = DeformableDetrConfig(
        backbone_config=TimmBackboneConfig(backbone=f'mpvit_{arch}', out_indices=[1, 2, 3],
                                           use_pretrained_backbone=False),
        num_labels=num_labels, num_queries=num_queries, num_feature_levels=num_feature_levels,
        with_box_refine=False, two_stage=False, auxiliary_loss=True, tie_word_embeddings=False,
        dropout=DROPOUT, attention_dropout=DROPOUT, activation_dropout=DROPOUT,
        focal_alpha=0.25, bbox_loss_coefficient=LOSS_WEIGHTS['loss_bbox'],
        giou_loss_coefficient=LOSS_WEIGHTS['loss_giou'], **MATCHER_COSTS,
    )
    model = DeformableDetrForObjectDetection(config)
    # Replace the frozen-BN copy transformers built with the core model and trainable norms.
    norm_layer = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    encoder = model.model.backbone
    encoder.model = DeformableDetrMPViTBackbone(arch, drop_path_rate=drop_path_rate, norm_layer=norm_layer)
    if list(encoder.intermediate_channel_sizes) != encoder.model.channels:
        raise RuntimeError(f'input projections built for {encoder.intermediate_channel_sizes}, '
                           f'backbone gives {encoder.model.channels}')
    # One head for every decoder layer, as in the original plain model.
    model.class_embed = nn.ModuleList([model.class_embed[0]] * len(model.class_embed))
    model.bbox_embed = nn.ModuleList([model.bbox_embed[0]] * len(model.bbox_embed))
    model.model.encoder.dropout = 0.0  # the original adds the position embedding to the maps and no dropout
    _init_like_original(model)
    return model


@torch.no_grad()
def _init_like_original(model: DeformableDetrForObjectDetection) -> None:
    detr = model.model
    for layer in list(detr.encoder.layers) + list(detr.decoder.layers):
        for p in layer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    for module in detr.modules():  # xavier above overwrote the deformable attention's own init
        if type(module).__name__ == 'DeformableDetrMultiscaleDeformableAttention':
            model._init_weights(module)
    nn.init.xavier_uniform_(detr.reference_points.weight, gain=1.0)
    nn.init.zeros_(detr.reference_points.bias)
    nn.init.normal_(detr.level_embed)
    nn.init.normal_(detr.query_position_embeddings.weight)
    for proj in detr.input_proj:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    prior_prob = 0.01
    model.class_embed[0].bias.fill_(-math.log((1 - prior_prob) / prior_prob))
    last = model.bbox_embed[0].layers[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    last.bias[2:] = -2.0


def weighted_loss(loss_dict: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The original total: class 2, box L1 5, GIoU 2, for the last decoder layer and each auxiliary one."""
    total = 0.
    for key, value in loss_dict.items():
        base = re.sub(r'_\d+$', '', key)
        if base in LOSS_WEIGHTS:
            total = total + LOSS_WEIGHTS[base] * value
    return total


def _accelerate_reduces() -> bool:
    """transformers' loss already all-reduces the box count when an ``accelerate`` state exists."""
    try:
        from accelerate import PartialState
    except ImportError:
        return False
    return PartialState._shared_state != {}


def global_box_normaliser(targets: List[Mapping[str, torch.Tensor]], device: torch.device) -> float:
    """Factor that turns transformers' losses (divided by this rank's target boxes, at least 1) into the
    original's (divided by the boxes of all ranks over the world size, at least 1).

    Every loss term that enters :func:`weighted_loss` is linear in 1 / num_boxes, so the product is exact.
    """
    local = float(sum(len(t['class_labels']) for t in targets))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or _accelerate_reduces():
        return 1.0
    total = torch.tensor([local], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return max(local, 1.0) / max(total.item() / torch.distributed.get_world_size(), 1.0)


def param_groups(model: nn.Module, lr: float, lr_backbone: float, lr_linear_proj_mult: float = 0.1) -> List[Dict]:
    """The original's three groups: backbone, sampling-offset / reference-point projections, the rest."""
    groups = {'backbone': [], 'linear_proj': [], 'rest': []}
    for name, p in model.named_parameters():  # shared heads are yielded once
        if not p.requires_grad:
            continue
        if name.startswith(BACKBONE_KEY):
            groups['backbone'].append(p)
        elif any(k in name for k in LINEAR_PROJ_NAMES):
            groups['linear_proj'].append(p)
        else:
            groups['rest'].append(p)
    return [dict(params=groups['rest'], lr=lr), dict(params=groups['backbone'], lr=lr_backbone),
            dict(params=groups['linear_proj'], lr=lr * lr_linear_proj_mult)]


# ------------------------------------------------------------------------ original checkpoint layout

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


def is_original_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(('transformer.', 'backbone.0.backbone.')) for k in state_dict)


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
        shown = ', '.join(unplaced[:5]) + (f', ... (+{len(unplaced) - 5} more)' if len(unplaced) > 5 else '')
        raise CheckpointError(f'{len(unplaced)} keys of the original Deformable DETR layout have no place in '
                              f'this model: {shown}')
    return out


def head_classes(checkpoint: Mapping) -> Optional[int]:
    """The outputs of a detector checkpoint's class head (our or the original layout; ``None`` without one):
    the class count it was trained with, known before any model is built."""
    state = unwrap_checkpoint(checkpoint)
    for key in ('class_embed.0.bias', 'class_embed.bias'):
        if key in state and hasattr(state[key], 'shape'):
            return int(state[key].shape[0])
    return None


def load_detector_weights(model: nn.Module, checkpoint: Mapping, strict: bool = True,
                          new_head: bool = False) -> List[str]:
    """Load a detector checkpoint in our or the original layout; a backbone-only one (classification or
    another task's) fills the backbone. Returns the keys left at their initial values.

    ``new_head`` (fine-tuning on other classes): a class head of another size than the model's is not
    loaded, so the model keeps its freshly initialised one; everything else must still fit."""
    state = unwrap_checkpoint(checkpoint)
    own = model.state_dict()
    if is_original_layout(state):
        state = convert_original_state_dict(state)
    elif not any(k.startswith(BACKBONE_KEY) for k in state):
        prefix = backbone_prefix(state)  # a classification / Detectron2 / mmseg checkpoint: backbone only
        backbone = model.model.backbone.model
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith('cls_head.')}
        check_fit(weights, backbone, what='backbone weights')
        backbone.load_state_dict(weights)
        return [k for k in own if not k.startswith(BACKBONE_KEY)]
    if strict:  # names missing, unexpected and mis-shaped keys
        check_fit(state, model, shape_may_differ=lambda k: new_head and k.startswith('class_embed.'))
    missing = [k for k in own if k not in state or state[k].shape != own[k].shape]
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    return missing


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, shared ones once (as ``model.parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
