"""Checks of a COCO instances file before training or evaluation starts, shared by the detection drivers.

Each problem is reported in one line naming the file and the first offending
image or annotation id, instead of failing at iteration 0 after the model is
built, deep inside a loss ("index 90 is out of bounds"), or not at all.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Mapping, Optional

from mpvit.errors import InvalidInputError, first_few

_SHOW = 3
_logger = logging.getLogger('mpvit.data')


def _usable_box(bbox: Any) -> bool:
    try:
        return len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0
    except TypeError:
        return False


def check_coco_instances(dataset: Mapping[str, Any], json_file: str, image_root: str, *,
                         max_category_id: Optional[int] = None, mask_format: Optional[str] = None) -> int:
    """Raise :class:`InvalidInputError` (a ``ValueError``) for a COCO instances dict (``json.load`` of
    ``json_file``) that training or evaluation cannot use correctly.

    Args:
        dataset: the parsed file (``images``, ``annotations``, ``categories``).
        json_file / image_root: named in the messages; ``image_root`` holds the listed ``file_name`` s.
        max_category_id: category ids must be below it (Deformable DETR uses them as class indices:
            ``--num-classes``); ``None``: any id listed under ``categories``.
        mask_format: ``'polygon'`` or ``'bitmask'`` when instance masks are trained (Detectron2's
            ``INPUT.MASK_FORMAT``): every non-crowd annotation then needs a usable ``segmentation``.

    Image and annotation ids must be unique, and every annotation's image id listed. Annotations whose box
    is empty (the readers drop them) are counted and named in a warning; returns their number.
    """
    images, annotations = dataset.get('images', []), dataset.get('annotations', [])
    for what, items in (('image', images), ('annotation', annotations)):
        repeated = sorted(i for i, n in Counter(item.get('id') for item in items).items() if n > 1)
        if repeated:  # the readers index by id: one entry would silently take another's place (or boxes)
            raise InvalidInputError(f'{json_file}: {len(repeated)} {what} ids are used more than once: '
                                    f'{first_few(repeated, _SHOW)}')
    image_ids = {im.get('id') for im in images}
    dangling = sorted({a.get('image_id') for a in annotations if a.get('image_id') not in image_ids}, key=str)
    if dangling:
        raise InvalidInputError(f'{json_file}: annotations point to {len(dangling)} image ids that are not among '
                                f'its images: {first_few(dangling, _SHOW)}')
    degenerate = [a.get('id') for a in annotations if not _usable_box(a.get('bbox'))]
    if degenerate:
        _logger.warning('%s: %d of %d annotations have no box of positive width and height: training leaves them '
                        'out, evaluation keeps them as objects no detection can match; ids %s', json_file,
                        len(degenerate), len(annotations), first_few(degenerate, _SHOW))
    missing = [im['file_name'] for im in dataset.get('images', [])
               if not os.path.isfile(os.path.join(image_root, im['file_name']))]
    if missing:
        raise InvalidInputError(f'{json_file}: {len(missing)} of {len(dataset["images"])} listed images are not in '
                                f'{image_root}: {first_few(missing, _SHOW)}')
    known = {c['id'] for c in dataset.get('categories', [])}
    for ann in dataset.get('annotations', []):
        where = f"{json_file}: annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        category = ann.get('category_id')
        if category not in known:
            raise InvalidInputError(f'{where} has category_id {category}, which is not among the file\'s categories '
                                    f'{sorted(known)[:10]}')
        if max_category_id is not None and not 0 <= category < max_category_id:
            raise InvalidInputError(f'{where} has category_id {category}, outside 0..{max_category_id - 1} '
                                    f'(--num-classes {max_category_id} must exceed the largest category id)')
        if mask_format is None or ann.get('iscrowd', 0):
            continue
        segmentation = ann.get('segmentation')
        if not segmentation:
            raise InvalidInputError(f'{where} has no segmentation ({segmentation!r}); instance-mask training needs '
                                    'one for every non-crowd annotation')
        if isinstance(segmentation, dict) and mask_format == 'polygon':
            raise InvalidInputError(f'{where} has an RLE segmentation, which polygon masks cannot hold: '
                                    'set INPUT.MASK_FORMAT bitmask')
        if isinstance(segmentation, list) and not any(len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            raise InvalidInputError(f'{where} has no polygon of 3 or more points: {str(segmentation)[:60]}')
    return len(degenerate)


def coco_categories(dataset: Mapping[str, Any]) -> dict:
    """The categories of a COCO instances dict, in id order: ``{'classes': [names], 'category_ids': [ids]}``
    (what a checkpoint stores to name its detector's labels)."""
    categories = sorted(dataset.get('categories', []), key=lambda c: c['id'])
    return {'classes': [str(c.get('name', c['id'])) for c in categories],
            'category_ids': [int(c['id']) for c in categories]}


def coco_label_space(dataset: Mapping[str, Any], json_file: str) -> int:
    """Outputs a detector needs whose labels are the category ids themselves (the reference DETR code's
    convention, 91 for COCO): the largest id among the file's categories and annotations, plus one."""
    ids = [c.get('id') for c in dataset.get('categories', [])] + \
        [a.get('category_id') for a in dataset.get('annotations', [])]
    ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
    if not ids:
        raise InvalidInputError(f'{json_file}: lists no categories, so the number of classes cannot follow the data')
    if min(ids) < 0:
        raise InvalidInputError(f'{json_file}: category id {min(ids)} is negative; ids are the class indices')
    return max(ids) + 1


def coco_2017_names() -> dict:
    """COCO 2017's 80 categories as ``{id: name}`` (ids 1..90 with gaps), from torchvision's metadata (no
    download): the names of the released checkpoints, which store none."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    names = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta['categories']
    return {i: n for i, n in enumerate(names) if n not in ('__background__', 'N/A')}


def is_coco_2017(dataset: Mapping[str, Any]) -> bool:
    """Whether a COCO instances dict has exactly COCO 2017's 80 categories (by id and name)."""
    meta = coco_categories(dataset)
    return dict(zip(meta['category_ids'], meta['classes'])) == coco_2017_names()
