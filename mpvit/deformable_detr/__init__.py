"""Deformable DETR with an MPViT backbone, on Hugging Face ``transformers`` (no custom CUDA build).

``transformers``' ``DeformableDetrForObjectDetection`` runs the multi-scale
deformable attention in pure PyTorch. Its defaults differ from the original
recipe (Zhu et al.; MPViT's released model is the plain variant: no box
refinement, no two-stage), so :func:`build_deformable_detr` sets them back:

* the backbone is the core MPViT with *trainable* (Sync)BN, as in the reference
  (transformers would freeze every BatchNorm of a backbone it builds), held by a
  wrapper as every adapter holds it (``model.backbone.model.backbone.*``);
* classification and box heads are one module shared by all decoder layers
  (the original's ``nn.ModuleList([head] * 6)``), with ``tie_word_embeddings``
  off so that transformers does not tie anything on its own;
* head initialisation of the original (focal prior 0.01 on the class bias, last
  box layer zero with bias[2:] = -2, xavier input projections and transformer,
  each deformable attention's own reset);
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

Split by role, as :mod:`mpvit.d2`: ``backbone`` (the wrapper), ``model``
(building and initialisation), ``loss``, ``solver`` (parameter groups) and
``checkpoint`` (:func:`convert_original_state_dict` maps the original
repository's layout, ``backbone.0.backbone.*``, ``transformer.*``,
``query_embed``, onto this model; :func:`load_detector_weights` reads every
released format).
"""
from mpvit.deformable_detr.backbone import BACKBONE_KEY, DeformableDetrMPViTBackbone, core_model
from mpvit.deformable_detr.checkpoint import (
    convert_original_state_dict,
    head_classes,
    is_original_layout,
    load_detector_weights,
    upgrade_state_dict,
)
from mpvit.deformable_detr.loss import LOSS_WEIGHTS, global_box_normaliser, weighted_loss
from mpvit.deformable_detr.model import MATCHER_COSTS, build_deformable_detr, reset_deformable_attention
from mpvit.deformable_detr.solver import param_groups

__all__ = [
    'BACKBONE_KEY', 'DeformableDetrMPViTBackbone', 'LOSS_WEIGHTS', 'MATCHER_COSTS', 'build_deformable_detr',
    'convert_original_state_dict', 'core_model', 'global_box_normaliser', 'head_classes', 'is_original_layout',
    'load_detector_weights', 'param_groups', 'reset_deformable_attention', 'upgrade_state_dict', 'weighted_loss',
]
