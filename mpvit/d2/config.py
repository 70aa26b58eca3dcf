"""The config keys of MPViT's Detectron2 projects (``add_mpvit_config``, before ``merge_from_file``)."""
from __future__ import annotations

from detectron2.config import CfgNode

STAGE_NAMES = ('stage2', 'stage3', 'stage4', 'stage5')


def add_mpvit_config(cfg: CfgNode) -> None:
    """Add the keys our configs use to a Detectron2 config (call before ``merge_from_file``)."""
    cfg.MODEL.MPVIT = CfgNode()
    cfg.MODEL.MPVIT.NAME = 'mpvit_small'  # mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base
    cfg.MODEL.MPVIT.OUT_FEATURES = list(STAGE_NAMES)
    cfg.MODEL.MPVIT.NORM = 'SyncBN'  # BN | SyncBN | FrozenBN | GN
    cfg.MODEL.MPVIT.DROP_PATH = 0.2
    # False builds the textbook ops: what FLOP counting needs (tools/analyze_model.py --tasks flop).
    cfg.MODEL.MPVIT.FAST_OPS = True
    cfg.SOLVER.OPTIMIZER = 'AdamW'  # AdamW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # lr factor of every parameter under model.backbone
    cfg.AUG = CfgNode()
    cfg.AUG.DETR = False  # DETR-style multi-scale + random-crop training augmentation
    # After a crop, boxes are clipped to it (the authors' mapper); True recomputes them from the cropped masks.
    cfg.AUG.RECOMPUTE_BOXES = False
