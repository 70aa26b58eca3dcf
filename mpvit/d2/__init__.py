"""MPViT as a Detectron2 backbone (RetinaNet, Mask R-CNN, Cascade Mask R-CNN), split by role as
Detectron2 projects are: ``config`` (``add_mpvit_config``), ``backbone`` (the ``Backbone`` and its
registered builders), ``data`` (augmentation, mapper, dataset registration), ``solver`` (optimizer)
and ``checkpoint`` (``MPViTCheckpointer`` and ``load_detector_weights``, every released format).

Importing the package registers ``build_mpvit_backbone``, ``build_mpvit_fpn_backbone`` and
``build_retinanet_mpvit_fpn_backbone`` with ``BACKBONE_REGISTRY``.
"""
from mpvit.d2.backbone import (
    D2MPViT,
    build_mpvit_backbone,
    build_mpvit_fpn_backbone,
    build_retinanet_mpvit_fpn_backbone,
)
from mpvit.d2.checkpoint import MPViTCheckpointer, load_detector_weights
from mpvit.d2.config import FEATURE_NAMES, STAGE_NAMES, add_mpvit_config, merge_user_config
from mpvit.d2.data import (
    LeaveOutUnreadable,
    SkipUnreadable,
    build_detr_augmentation,
    build_train_loader,
    build_train_mapper,
    register_coco_datasets,
)
from mpvit.d2.solver import build_optimizer

__all__ = [
    'D2MPViT', 'FEATURE_NAMES', 'MPViTCheckpointer', 'STAGE_NAMES', 'add_mpvit_config', 'load_detector_weights',
    'merge_user_config', 'build_mpvit_backbone',
    'build_mpvit_fpn_backbone', 'build_retinanet_mpvit_fpn_backbone', 'build_detr_augmentation', 'build_optimizer',
    'LeaveOutUnreadable', 'SkipUnreadable', 'build_train_loader', 'build_train_mapper', 'register_coco_datasets',
]
