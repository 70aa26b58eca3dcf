"""The config keys of MPViT's Detectron2 projects (``add_mpvit_config``, before ``merge_from_file``), and the
merge of a user's config file and command-line options with one-line errors (``merge_user_config``)."""
from __future__ import annotations

import os
from typing import Sequence

import yaml
from detectron2.config import CfgNode

from mpvit.errors import InvalidInputError, MissingFileError

STAGE_NAMES = ('stage2', 'stage3', 'stage4', 'stage5')
# Every level MODEL.MPVIT.OUT_FEATURES can name, shallow to deep: the stem's first conv (stride 2) and its output
# (stride 4, named as Detectron2's ResNet names its stem), then the four stages (strides 4..32).
FEATURE_NAMES = ('stage1', 'stem') + STAGE_NAMES


def add_mpvit_config(cfg: CfgNode) -> None:
    """Add the keys our configs use to a Detectron2 config (call before ``merge_from_file``)."""
    cfg.MODEL.MPVIT = CfgNode()
    cfg.MODEL.MPVIT.NAME = 'mpvit_small'  # mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base
    cfg.MODEL.MPVIT.OUT_FEATURES = list(STAGE_NAMES)
    cfg.MODEL.MPVIT.NORM = 'SyncBN'  # BN | SyncBN | FrozenBN | GN
    cfg.MODEL.MPVIT.DROP_PATH = 0.2
    # False builds the textbook ops: what FLOP counting needs (tools/analyze_model.py --tasks flop).
    cfg.MODEL.MPVIT.FAST_OPS = True
    # 'always' runs each stage's transformer paths as one batch (mpvit.set_batch_paths); 'auto': path by path.
    cfg.MODEL.MPVIT.BATCH_PATHS = 'auto'
    cfg.SOLVER.OPTIMIZER = 'AdamW'  # AdamW | SGD
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0  # lr factor of every parameter under model.backbone
    cfg.AUG = CfgNode()
    cfg.AUG.DETR = False  # DETR-style multi-scale + random-crop training augmentation
    # After a crop, boxes are clipped to it (the authors' mapper); True recomputes them from the cropped masks.
    cfg.AUG.RECOMPUTE_BOXES = False


def _one_line(err: BaseException) -> str:
    text = ' '.join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return text or type(err).__name__


def merge_user_config(cfg: CfgNode, config_file: str, opts: Sequence[str]) -> None:
    """``merge_from_file`` then ``merge_from_list``, with what the user got wrong in one line: a missing file,
    a YAML syntax error, a key neither Detectron2 nor MPViT has, a value of the wrong type, an odd KEY VALUE
    list."""
    if not os.path.isfile(config_file):
        raise MissingFileError(f'--config-file {config_file}: no such file')
    try:
        cfg.merge_from_file(config_file)
    except (yaml.YAMLError, KeyError, ValueError) as e:
        raise InvalidInputError(f'--config-file {config_file}: {_one_line(e)}') from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:  # yacs asserts on an odd-length list
        raise InvalidInputError(f'command-line config options: {_one_line(e)}') from None
