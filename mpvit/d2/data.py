"""Training data for MPViT's Detectron2 configs: the authors' DETR-style augmentation and mapper, and
``--coco-dataset`` registration."""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T

_logger = logging.getLogger(__name__)


def build_detr_augmentation(cfg: CfgNode) -> List[T.Augmentation]:
    """DETR's training augmentation: flip, then either a multi-scale resize, or (half of the time)
    a resize to 400/500/600, a random crop of ``INPUT.CROP.SIZE`` and the multi-scale resize."""
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)
    crop = T.AugmentationList([
        T.ResizeShortestEdge([400, 500, 600], sample_style='choice'),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
    ])
    flip = T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == 'horizontal', vertical=cfg.INPUT.RANDOM_FLIP == 'vertical')
    return [flip, T.RandomApply(crop, prob=0.5), resize]


def build_train_mapper(cfg: CfgNode) -> Optional[DatasetMapper]:
    """The training mapper: ``None`` (Detectron2's default) unless ``AUG.DETR`` asks for DETR's augmentation."""
    if not cfg.AUG.DETR:
        return None
    logging.getLogger('detectron2.mpvit').info(
        'AUG.DETR: flip, then multi-scale resize %s (max %d), or with p=0.5 resize to 400/500/600 + %s crop %s '
        'first; boxes %s', tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.CROP.TYPE,
        tuple(cfg.INPUT.CROP.SIZE), 'recomputed from masks' if cfg.AUG.RECOMPUTE_BOXES else 'clipped to the crop')
    return DatasetMapper(cfg, is_train=True, augmentations=build_detr_augmentation(cfg),
                         recompute_boxes=cfg.MODEL.MASK_ON and cfg.AUG.RECOMPUTE_BOXES)


def register_coco_datasets(specs: Optional[List[List[str]]]) -> None:
    """Register ``[NAME, JSON, IMAGE_DIR]`` COCO-format datasets (``--coco-dataset``), checking the paths exist."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in specs or []:
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise FileNotFoundError(f'--coco-dataset {name}: {path} does not exist')
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)
