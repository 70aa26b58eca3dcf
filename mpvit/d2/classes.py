"""The detector's class count follows the data (``follow_dataset_classes``), and the class names travel in the
checkpoints (``dataset_meta``).

``UNSET`` is put in ``MODEL.ROI_HEADS.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES`` before the user's
config is merged: a key still ``UNSET`` afterwards was not set by the user, and takes the data's count.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog

from mpvit.check_data import read_coco_file
from mpvit.errors import InvalidInputError, first_few
from mpvit.serialization import CheckpointError

_logger = logging.getLogger(__name__)
UNSET = -1
COCO_DEFAULT = 80  # Detectron2's default, for a dataset whose categories cannot be read
_KEYS = ('MODEL.ROI_HEADS.NUM_CLASSES', 'MODEL.RETINANET.NUM_CLASSES')


def mark_num_classes_unset(cfg: CfgNode) -> None:
    """Call before merging the user's config (see the module's docstring)."""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = UNSET
    cfg.MODEL.RETINANET.NUM_CLASSES = UNSET


def num_classes_key(cfg: CfgNode) -> str:
    return _KEYS[1] if 'RetinaNet' in cfg.MODEL.META_ARCHITECTURE else _KEYS[0]


def num_classes(cfg: CfgNode) -> int:
    return cfg.MODEL.RETINANET.NUM_CLASSES if 'RetinaNet' in cfg.MODEL.META_ARCHITECTURE else \
        cfg.MODEL.ROI_HEADS.NUM_CLASSES


_CATEGORIES: Dict[str, List[str]] = {}  # COCO json path -> category names by id (COCO's training file is large)


def read_coco_json(path: str) -> Dict:
    """A COCO json; its category names are kept for ``dataset_classes`` (the rest is not kept in memory)."""
    dataset = read_coco_file(path)
    categories = dataset.get('categories') if isinstance(dataset, dict) else None
    if isinstance(categories, list) and all(isinstance(c, dict) for c in categories):  # else refused by the check
        categories = sorted(categories, key=lambda c: (0, c['id']) if isinstance(c.get('id'), int)
                            else (1, str(c.get('id'))))
        _CATEGORIES[os.path.abspath(path)] = [str(c.get('name')) for c in categories]
    return dataset


def dataset_classes(name: str) -> Optional[List[str]]:
    """The category names of a registered dataset in Detectron2's contiguous order (by category id), from
    its COCO json or its metadata; None when neither is there (yet)."""
    meta = MetadataCatalog.get(name)
    json_file = meta.get('json_file')
    if json_file and os.path.isfile(json_file):
        if os.path.abspath(json_file) not in _CATEGORIES:
            read_coco_json(json_file)
        return list(_CATEGORIES[os.path.abspath(json_file)])
    return list(meta.thing_classes) if meta.get('thing_classes') else None


def _where(name: str) -> str:
    return MetadataCatalog.get(name).get('json_file') or name


def check_same_classes(names: Sequence[str], classes: Sequence[str], names_what: str, classes_what: str,
                       error: type = InvalidInputError) -> None:
    """One line when two lists of class names differ (another count, other names, or another order): the
    model's label i would be scored, or named, as another class."""
    if list(names) == list(classes):
        return
    differ = [f'{i}: {a!r} vs {b!r}' for i, (a, b) in enumerate(zip(names, classes)) if a != b]
    raise error(f'{names_what} has {len(names)} categories and {classes_what} {len(classes)}, not the same '
                f'(by contiguous index: {first_few(differ, 3) or "one list is longer"}): a label would be '
                'scored as another class')


def follow_dataset_classes(cfg: CfgNode, dataset_names: Sequence[str], user_classes: Optional[int] = None) -> str:
    """Set the class count the user left ``UNSET`` from ``dataset_names`` (training: the training and test
    sets, which must have the same categories; evaluation: the test sets; a demo: the checkpoint's
    ``user_classes``), else check the user's value against them, in one line naming the file, both counts
    and the key. Returns what was decided, for the log (which is set up later)."""
    found_classes = {name: classes for name in dataset_names if (classes := dataset_classes(name)) is not None}
    named = list(found_classes.items())
    for name, classes in named[1:]:
        check_same_classes(named[0][1], classes, _where(named[0][0]), _where(name))
    counts = {name: len(classes) for name, classes in named}
    found = user_classes if user_classes is not None else next(iter(counts.values()), None)
    key = num_classes_key(cfg)
    if num_classes(cfg) == UNSET:
        value = found if found is not None else COCO_DEFAULT
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = value
        if found is None:
            return f"{key} = {value}: Detectron2's default (no dataset categories to follow; set it for your data)"
        return f'{key} = {value}, from the data ({", ".join(_where(n) for n in counts) or "the checkpoint"})'
    for name, count in counts.items():
        if count != num_classes(cfg):
            where = MetadataCatalog.get(name).get('json_file') or name
            raise InvalidInputError(f'{where}: {count} categories, but {key} is {num_classes(cfg)}; leave '
                                    f'{key} out to follow the data, or set it to {count}')
    # The other meta-architecture's key is unused; keep it consistent for configs that are printed.
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = cfg.MODEL.RETINANET.NUM_CLASSES = num_classes(cfg)
    return f'{key} = {num_classes(cfg)}, as set'


def dataset_meta(name: str) -> Dict:
    """What a checkpoint keeps of its training set: the class names in the model's order."""
    return {'dataset': name, 'thing_classes': dataset_classes(name) or []}


def checkpoint_classes(state: Mapping) -> Optional[List[str]]:
    """The class names a Detectron2 checkpoint of this repository carries (``dataset_meta``), if any."""
    meta = state.get('dataset_meta') if isinstance(state, Mapping) else None
    names = meta.get('thing_classes') if isinstance(meta, Mapping) else None
    return list(names) if names else None


def head_classes(weights: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Optional[int]:
    """The class count the classification layer in ``weights`` was built for (ROI heads: rows - 1 for the
    background; RetinaNet: rows / anchors, anchors from ``model``'s own layer), or None."""
    own = model.state_dict()
    for key, value in weights.items():
        if not key.endswith('cls_score.weight') or key not in own:
            continue
        if key.startswith('roi_heads.'):
            return value.shape[0] - 1
        anchors = own[key].shape[0] // model.num_classes
        return value.shape[0] // anchors
    return None


def check_head_classes(weights: Mapping[str, torch.Tensor], model: torch.nn.Module, what: str) -> None:
    """One line when a detector checkpoint's heads are for another number of classes than the model's (not
    the ``another variant`` of a general key mismatch)."""
    theirs = head_classes(weights, model)
    ours = getattr(model, 'num_classes', None) or getattr(getattr(model, 'roi_heads', None), 'num_classes', None)
    if theirs is not None and ours is not None and theirs != ours:
        raise CheckpointError(f'{what} has heads for {theirs} classes, the model {ours}: use it with data of its '
                              f'{theirs} categories (DATASETS.TEST, --coco-dataset), or set NUM_CLASSES {theirs}')
