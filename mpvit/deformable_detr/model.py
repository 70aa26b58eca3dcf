"""Building Deformable DETR + MPViT on transformers with the original recipe's settings and initialisation."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn as nn
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, TimmBackboneConfig
from transformers.models.deformable_detr.modeling_deformable_detr import DeformableDetrMultiscaleDeformableAttention

from mpvit.deformable_detr.backbone import DeformableDetrMPViTBackbone
from mpvit.deformable_detr.loss import LOSS_WEIGHTS
from mpvit.errors import InvalidInputError
from mpvit.models.mpvit import check_levels, mpvit_arch

__all__ = ['DROPOUT', 'MATCHER_COSTS', 'build_deformable_detr', 'reset_deformable_attention']

MATCHER_COSTS = dict(class_cost=2, bbox_cost=5, giou_cost=2)
DROPOUT = 0.1


def build_deformable_detr(
        backbone: str = 'mpvit_small',
        num_labels: int = 91,
        num_queries: int = 300,
        num_feature_levels: int = 4,
        drop_path_rate: float = 0.,
        sync_bn: bool = False,
        out_indices: Sequence[Union[int, str]] = (1, 2, 3),
        fast_ops: bool = True,
        batch_paths: str = 'auto',
) -> DeformableDetrForObjectDetection:
    """Plain Deformable DETR (stages 3-5 + one extra level) with the original recipe's settings.

    Args:
        backbone: the MPViT variant (``'mpvit_small'``, timm's names).
        num_labels: object classes (91 for COCO's category ids, as the original).
        num_queries: object queries.
        num_feature_levels: the backbone levels plus the extra stride-2 levels convolved from the last one,
            as in transformers.
        drop_path_rate: the backbone's stochastic depth.
        sync_bn: SyncBatchNorm in the backbone (multi-GPU training), else BatchNorm2d.
        out_indices: the backbone levels (:class:`DeformableDetrMPViTBackbone`).
        fast_ops, batch_paths: as for every adapter (:func:`mpvit.models.create_features`).
    """
    import mpvit.models  # noqa: F401  (registers the timm models the backbone config names)

    arch = mpvit_arch(backbone)  # a clear error for anything but an MPViT variant
    name = 'mpvit_' + backbone.removeprefix('mpvit_')
    # In the order the backbone returns them (transformers sizes its input projections in this order).
    names, stages = check_levels(out_indices, len(arch['num_layers']))
    levels = names + stages
    if not stages or len(levels) > num_feature_levels:
        raise InvalidInputError(f'out_indices {tuple(levels)}: at least one stage and at most num_feature_levels '
                                f'({num_feature_levels}) levels')
    config = DeformableDetrConfig(
        # transformers' TimmBackboneConfig takes integer indices: the stages; the stem levels are added below.
        backbone_config=TimmBackboneConfig(backbone=name, out_indices=stages, use_pretrained_backbone=False),
        num_labels=num_labels, num_queries=num_queries, num_feature_levels=num_feature_levels,
        with_box_refine=False, two_stage=False, auxiliary_loss=True, tie_word_embeddings=False,
        dropout=DROPOUT, attention_dropout=DROPOUT, activation_dropout=DROPOUT,
        focal_alpha=0.25, bbox_loss_coefficient=LOSS_WEIGHTS['loss_bbox'],
        giou_loss_coefficient=LOSS_WEIGHTS['loss_giou'], **MATCHER_COSTS,
    )
    model = DeformableDetrForObjectDetection(config)
    # Replace the frozen-BN copy transformers built with the core model (wrapped) and trainable norms.
    norm_layer = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d
    encoder = model.model.backbone
    encoder.model = DeformableDetrMPViTBackbone(name, levels, norm_layer=norm_layer, drop_path_rate=drop_path_rate,
                                                fast_ops=fast_ops, batch_paths=batch_paths)
    if len(levels) > len(stages):
        stem_channels = encoder.model.channels[:len(levels) - len(stages)]
        _project_stem_levels(model, stem_channels, num_feature_levels - len(levels))
    if list(encoder.intermediate_channel_sizes) != encoder.model.channels:
        raise RuntimeError(f'input projections built for {encoder.intermediate_channel_sizes}, '
                           f'backbone gives {encoder.model.channels}')
    # One head for every decoder layer, as in the original plain model.
    model.class_embed = nn.ModuleList([model.class_embed[0]] * len(model.class_embed))
    model.bbox_embed = nn.ModuleList([model.bbox_embed[0]] * len(model.bbox_embed))
    model.model.encoder.dropout = 0.0  # the original adds the position embedding to the maps and no dropout
    _init_like_original(model)
    return model


def _project_stem_levels(model: DeformableDetrForObjectDetection, channels: Sequence[int], extra: int) -> None:
    """Input projections for the stem levels in front of the stages' (transformers built them for the stages
    only): a 1x1 conv + GroupNorm each, as transformers builds its own, and ``extra`` stride-2 levels after."""
    detr = model.model
    d_model = model.config.d_model
    stem = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(32, d_model)) for c in channels]
    stages = len(detr.backbone.intermediate_channel_sizes)
    detr.input_proj = nn.ModuleList(stem + list(detr.input_proj[:stages + extra]))
    detr.backbone.intermediate_channel_sizes = list(channels) + list(detr.backbone.intermediate_channel_sizes)


@torch.no_grad()
def reset_deformable_attention(attn: DeformableDetrMultiscaleDeformableAttention) -> None:
    """The original ``MSDeformAttn._reset_parameters``: every head starts sampling along its own direction
    (spread evenly round the circle, scaled to the unit square's edge), point ``i`` at ``i + 1`` times that
    offset on every level, with uniform attention weights."""
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    nn.init.zeros_(attn.sampling_offsets.weight)
    angle = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    direction = torch.stack([angle.cos(), angle.sin()], -1)
    direction = direction / direction.abs().max(-1, keepdim=True).values
    step = torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    grid = (direction.view(heads, 1, 1, 2) * step).expand(heads, levels, points, 2)
    attn.sampling_offsets.bias.copy_(grid.reshape(-1))
    nn.init.zeros_(attn.attention_weights.weight)
    nn.init.zeros_(attn.attention_weights.bias)
    for proj in (attn.value_proj, attn.output_proj):
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)


@torch.no_grad()
def _init_like_original(model: DeformableDetrForObjectDetection) -> None:
    """The original's order: xavier on the transformer's matrices, then each deformable attention's own
    reset, reference points, level embedding, queries, input projections and heads."""
    detr = model.model
    for layer in list(detr.encoder.layers) + list(detr.decoder.layers):
        for p in layer.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    attentions = [m for m in detr.modules() if isinstance(m, DeformableDetrMultiscaleDeformableAttention)]
    expected = detr.config.encoder_layers + detr.config.decoder_layers
    if len(attentions) != expected:  # transformers changed its layout: the init below would be incomplete
        raise RuntimeError(f'found {len(attentions)} deformable attention modules in transformers '
                           f'DeformableDetrModel, expected {expected}')
    for attn in attentions:  # xavier above overwrote their own init
        reset_deformable_attention(attn)
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
