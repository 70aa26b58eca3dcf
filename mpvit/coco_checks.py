"""Checks of a COCO instances file before training or evaluation starts, shared by the detection drivers,
and what they read of its categories.

The checks are ``python -m mpvit.check_data coco``'s (:func:`mpvit.check_data.check_coco`); a driver stops
on the first kind of problem in one line naming the file and its entries, instead of failing at iteration 0
after the model is built, deep inside a loss ("index 90 is out of bounds"), or not at all.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from mpvit.check_data import check_coco, read_coco_file
from mpvit.errors import InvalidInputError

__all__ = ['check_coco_instances', 'coco_2017_names', 'coco_categories', 'coco_label_space', 'is_coco_2017',
           'read_coco_file']


def check_coco_instances(dataset: Any, json_file: str, image_root: str, *,
                         max_category_id: Optional[int] = None, mask_format: Optional[str] = None,
                         evaluation: bool = False, exif_transpose: bool = True) -> int:
    """Raise :class:`InvalidInputError` (a ``ValueError``) in one line for a COCO instances dict (``json.load``
    of ``json_file``) that training or evaluation cannot use correctly: the checks of
    ``python -m mpvit.check_data coco`` (:func:`mpvit.check_data.check_coco`, whose arguments these are).
    Annotations without ``area`` get pycocotools' in ``dataset``; warnings are logged once per kind.

    ``max_category_id``: category ids must be below it (Deformable DETR uses them as class indices:
    ``--num-classes``). Returns the number of annotations whose box is empty (the readers drop them).
    """
    report = check_coco(dataset, json_file, image_root, mask_format=mask_format, evaluation=evaluation,
                        exif_transpose=exif_transpose)
    if max_category_id is not None and not report.errors:
        for ann in dataset['annotations']:
            category = ann['category_id']
            if not 0 <= category < max_category_id:
                report.error(f'annotations have a category_id outside 0..{max_category_id - 1}',
                             f"annotation id {ann['id']} (image id {ann['image_id']}): category_id {category}",
                             f'--num-classes {max_category_id} must exceed the largest category id')
    report.raise_errors()
    empty = next((f for what, f in report.warnings.items() if 'no box of positive' in what), None)
    return len(empty.entries) if empty else 0


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
