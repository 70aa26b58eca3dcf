"""Training data for MPViT's Detectron2 configs: the authors' DETR-style augmentation and mapper, the
drivers' rule for unreadable images (left out of training, refused in evaluation), and
``--coco-dataset`` registration."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.samplers import RepeatFactorTrainingSampler
from torch.utils.data import Dataset

from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import decode_error, is_high_depth, unreadable_error, warn_unreadable


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


def build_train_mapper(cfg: CfgNode) -> SkipUnreadable:
    """The training mapper: Detectron2's default, or DETR's augmentation when ``AUG.DETR`` asks for it; in
    either case unreadable images are left out (:class:`SkipUnreadable`)."""
    if not cfg.AUG.DETR:
        return SkipUnreadable(DatasetMapper(cfg, is_train=True), is_train=True)
    logging.getLogger('detectron2.mpvit').info(
        'AUG.DETR: flip, then multi-scale resize %s (max %d), or with p=0.5 resize to 400/500/600 + %s crop %s '
        'first; boxes %s', tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.CROP.TYPE,
        tuple(cfg.INPUT.CROP.SIZE), 'recomputed from masks' if cfg.AUG.RECOMPUTE_BOXES else 'clipped to the crop')
    return SkipUnreadable(DatasetMapper(cfg, is_train=True, augmentations=build_detr_augmentation(cfg),
                                        recompute_boxes=cfg.MODEL.MASK_ON and cfg.AUG.RECOMPUTE_BOXES), is_train=True)


class SkipUnreadable:
    """A dataset mapper that handles unreadable images as every driver does: in training it returns ``None``
    for one, with a warning naming it (:class:`LeaveOutUnreadable` then maps the next record), in evaluation
    it refuses it in one line. A 16-bit grey image counts as unreadable: Detectron2's reader would clip it
    to white. Only a file that cannot be decoded is handled; any other error keeps its traceback.

    Args:
        mapper: Detectron2's mapper (``DatasetMapper``) that reads and augments a record.
        is_train: leave an unreadable image out (training) rather than refuse it (evaluation).
    """

    def __init__(self, mapper: Callable[[Dict], Any], is_train: bool):
        self.mapper, self.is_train, self.left_out = mapper, is_train, 0

    def __call__(self, dataset_dict: Dict) -> Any:
        path = dataset_dict['file_name']
        error = OSError('a 16-bit grey image, which Detectron2 would read clipped to white: convert it to 8 bits') \
            if _is_high_depth_file(path) else None
        if error is None:
            try:
                return self.mapper(dataset_dict)
            except OSError as e:
                error = decode_error(path)  # the image itself, or something else (which keeps its traceback)
                if error is None:
                    raise e
        if not self.is_train:
            raise unreadable_error(path, error) from None
        self.left_out += 1
        warn_unreadable(path, error, self.left_out)
        return None


def _is_high_depth_file(path: str) -> bool:
    """16-bit grey; ``False`` for a file that cannot be opened (the mapper's read reports it)."""
    try:
        return is_high_depth(path)
    except OSError:
        return False


class LeaveOutUnreadable(Dataset):
    """Training records through a :class:`SkipUnreadable` mapper; an unreadable image is left out and the
    next readable record takes its place, as in the other drivers. (Detectron2's own fallback, a random
    other record, fails on Python >= 3.11: ``random.sample`` of a set.)

    Args:
        records: the dataset dicts (``get_detection_dataset_dicts``).
        mapper: the training mapper, which returns ``None`` for an unreadable image.
    """

    def __init__(self, records: List[Dict], mapper: SkipUnreadable):
        self.records, self.mapper = DatasetFromList(records, copy=False), mapper  # serialised, as Detectron2's

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict:
        for offset in range(len(self)):
            mapped = self.mapper(self.records[(index + offset) % len(self)])
            if mapped is not None:
                return mapped
        raise InvalidInputError('no readable image in the training set')


def _mapped_already(record: Dict) -> Dict:
    return record


def build_train_loader(cfg: CfgNode):
    """Detectron2's training loader over :class:`LeaveOutUnreadable` records (the same records, samplers and
    batching as ``build_detection_train_loader(cfg)``), mapped by :func:`build_train_mapper`."""
    records = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    sampler = None  # Detectron2 picks it from cfg by the dataset's length, except this one that reads records:
    if cfg.DATALOADER.SAMPLER_TRAIN == 'RepeatFactorTrainingSampler':
        sampler = RepeatFactorTrainingSampler(RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            records, cfg.DATALOADER.REPEAT_THRESHOLD))
    return build_detection_train_loader(cfg, dataset=LeaveOutUnreadable(records, build_train_mapper(cfg)),
                                        mapper=_mapped_already, sampler=sampler)


def register_coco_datasets(specs: Optional[List[List[str]]]) -> None:
    """Register ``[NAME, JSON, IMAGE_DIR]`` COCO-format datasets (``--coco-dataset``), checking the paths exist."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for name, json_file, image_root in specs or []:
        for path in (json_file, image_root):
            if not os.path.exists(path):
                raise MissingFileError(f'--coco-dataset {name}: {path} does not exist')
        if name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)
