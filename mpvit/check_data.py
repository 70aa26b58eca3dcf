"""Check a dataset before training on it: every malformed entry named, with its file and the fix.

    python -m mpvit.check_data coco ANNOTATIONS.json IMAGE_DIR [--for detectron2|deformable_detr] [--eval]
    python -m mpvit.check_data imagefolder DATA_DIR            (DATA_DIR/{train,val}/<class>/<image>)
    python -m mpvit.check_data segmentation IMAGE_DIR MASK_DIR --classes 150 [--reduce-zero-label]

Each entry is read once; image sizes come from the file headers (nothing is decoded but segmentation masks,
whose values are checked). Problems are grouped by kind: errors list their entries (``--show``) and make the
command exit 1; warnings (boxes of no area, EXIF orientation, filled-in areas) are counted and shown once.
The drivers run the same checks before any model is built and stop on the first kind of error in one line
(:meth:`Report.raise_errors`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from mpvit.errors import InvalidInputError, MissingFileError, first_few

__all__ = ['Report', 'check_coco', 'check_image_files', 'check_imagefolder', 'check_segmentation',
           'fill_missing_areas', 'main', 'read_coco_file']

_logger = logging.getLogger('mpvit.data')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # torchvision's
_EXIF_ORIENTATION = 274
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (Detectron2's read_image turns them)


@dataclass
class Finding:
    """One kind of problem: what is wrong, how to fix it, and every entry that has it."""
    what: str
    fix: str
    entries: List[str] = field(default_factory=list)

    def line(self, show: int = 3) -> str:
        if self.entries == ['']:  # a problem of the whole file
            return f'{self.what}: {self.fix}'
        return f'{len(self.entries)} {self.what}: {first_few(self.entries, show)}; {self.fix}'


class Report:
    """The problems found in one dataset file or folder (``source``): errors, and warnings counted per kind.

    Args:
        source: the file or folder checked; every line names it.
        command: the ``python -m mpvit.check_data ...`` line that lists every problem, named when some are cut.
    """

    def __init__(self, source: str, command: str = ''):
        self.source, self.command = source, command
        self.errors: Dict[str, Finding] = {}
        self.warnings: Dict[str, Finding] = {}

    def error(self, what: str, entry: str, fix: str) -> None:
        self.errors.setdefault(what, Finding(what, fix)).entries.append(entry)

    def warn(self, what: str, entry: str, fix: str) -> None:
        self.warnings.setdefault(what, Finding(what, fix)).entries.append(entry)

    def lines(self, show: int = 10) -> List[str]:
        """Every kind of error, then of warning, one line each with up to ``show`` entries (0: all)."""
        show = show or sys.maxsize
        return ([f'error: {self.source}: {f.line(show)}' for f in self.errors.values()] +
                [f'warning: {self.source}: {f.line(show)}' for f in self.warnings.values()])

    def log_warnings(self) -> None:
        for finding in self.warnings.values():
            _logger.warning('%s: %s', self.source, finding.line())

    def raise_errors(self) -> None:
        """Log the warnings; raise :class:`InvalidInputError` naming the first kind of error (and how many
        other kinds there are) in one line."""
        self.log_warnings()
        if not self.errors:
            return
        first, *rest = self.errors.values()
        more = f' (+{len(rest)} more kinds of problem: `{self.command}` lists them all)' if rest and self.command \
            else ''
        raise InvalidInputError(f'{self.source}: {first.line()}{more}')


# ------------------------------------------------------------------------------------------------ images

def header_size(path: str, exif_transpose: bool) -> Tuple[Optional[Tuple[int, int]], int, str]:
    """``((width, height), exif_orientation, why_unreadable)`` from the file's header only. ``exif_transpose``:
    the size as a reader that applies EXIF orientation (Detectron2's ``read_image``) returns it."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = 0
            if 'exif' in image.info or image.format == 'TIFF':
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 0) or 0)
    except OSError as e:  # PIL's UnidentifiedImageError, a truncated header
        return None, 0, ' '.join(str(e).split()) or type(e).__name__
    if exif_transpose and orientation in _SWAPS_SIDES:
        width, height = height, width
    return (width, height), orientation, ''


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_NUMBER_TYPES = frozenset({int, float})


def _finite_numbers(values: list) -> bool:
    """Every value an int or float (not a bool, string or None) and finite, in loops that run in C: COCO
    2017 train has 860k boxes and polygons (a NaN or infinity makes the sum non-finite)."""
    try:
        return _NUMBER_TYPES.issuperset(map(type, values)) and math.isfinite(sum(values))
    except OverflowError:  # an integer beyond any float
        return False


# ------------------------------------------------------------------------------------------------ COCO

def _polygon_problem(segmentation: list) -> str:
    """Why a polygon list cannot be a mask ('' if at least one polygon of 3+ points has finite numbers)."""
    usable = [p for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
              and _finite_numbers(p)]
    return '' if usable else f'no polygon of 3 or more points ({str(segmentation)[:60]})'


def _rle_problem(segmentation: Mapping, height: Any, width: Any) -> str:
    size, counts = segmentation.get('size'), segmentation.get('counts')
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return f'an RLE without a [height, width] size ({str(size)[:40]})'
    if not isinstance(counts, (str, list)) or isinstance(counts, list) and not {int}.issuperset(map(type, counts)):
        return f'an RLE whose counts are not a string or a list of integers ({str(counts)[:40]})'
    if size != [height, width]:
        return f'an RLE of size {size} on an image of [height, width] [{height}, {width}]'
    return ''


def annotation_area(annotation: Mapping, height: int, width: int) -> float:
    """The area pycocotools gives an annotation: its mask's pixels (``annToRLE`` + ``area``), else box w*h."""
    segmentation = annotation.get('segmentation')
    if segmentation:
        from pycocotools import mask as mask_utils

        if isinstance(segmentation, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get('counts'), list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return float(mask_utils.area(rle))
    return float(annotation['bbox'][2] * annotation['bbox'][3])


def fill_missing_areas(dataset: Mapping[str, Any]) -> int:
    """Give every annotation without a finite ``area`` the one pycocotools computes (COCO evaluation sorts
    objects by it); returns how many were filled. Call on a checked dataset (sizes and boxes usable)."""
    sizes = {im['id']: (im['height'], im['width']) for im in dataset.get('images', [])}
    filled = 0
    for annotation in dataset.get('annotations', []):
        if not _is_number(annotation.get('area')):
            annotation['area'] = annotation_area(annotation, *sizes[annotation['image_id']])
            filled += 1
    return filled


def _check_keys(report: Report, items: Any, what: str, keys: Dict[str, str], key_fix: str) -> List[Mapping]:
    """The entries of ``items`` that are dicts with every key of ``keys`` (key -> type check name)."""
    if not isinstance(items, list):
        report.error(f'"{what}s" that is not a list', type(items).__name__, f'"{what}s" must be a list of objects')
        return []
    good = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            report.error(f'{what} entries that are not objects', f'#{index}: {str(item)[:40]}', key_fix)
            continue
        missing = [key for key in keys if key not in item]
        if missing:
            report.error(f'{what} entries without {", ".join(missing)}',
                         f'#{index} (id {item.get("id")})', key_fix)
            continue
        wrong = [key for key, kind in keys.items() if not _TYPE_CHECKS[kind](item[key])]
        if wrong:
            report.error(f'{what} entries whose {"/".join(wrong)} is of the wrong type',
                         f'#{index} (id {item.get("id")}): ' + ', '.join(f'{k}={item[k]!r}'[:50] for k in wrong),
                         'ids are integers (an annotation\'s may be strings), sizes positive integers, names and '
                         'file names non-empty strings')
            continue
        good.append(item)
    return good


_TYPE_CHECKS = {
    'int': _is_int,
    'positive': lambda v: _is_int(v) and v > 0,
    'name': lambda v: isinstance(v, str) and v != '',
    'key': lambda v: _is_int(v) or isinstance(v, str),  # what the readers can index by
    'any': lambda v: True,
}


def check_coco(dataset: Any, json_file: str, image_root: str, *, exif_transpose: bool = True,
               evaluation: bool = False, mask_format: Optional[str] = None, fill_areas: bool = True,
               check_files: bool = True) -> Report:
    """Every problem of a COCO instances dict (``json.load`` of ``json_file``) whose images are under
    ``image_root``, in a :class:`Report`; nothing is raised.

    ``exif_transpose``: the framework turns EXIF-oriented images (Detectron2 does, torchvision's reader in
    Deformable DETR does not), so the json's width / height must be the turned ones. ``evaluation``: the file
    is scored, so it needs images and annotations. ``mask_format`` (``'polygon'`` / ``'bitmask'``): instance
    masks are trained, so every non-crowd annotation needs a usable segmentation. ``fill_areas``: annotations
    without ``area`` get pycocotools' (in ``dataset``, for this run), with a warning counting them.
    """
    command = f'python -m mpvit.check_data coco {json_file} {image_root}'
    report = Report(json_file, command)
    if not isinstance(dataset, dict):
        report.error('top-level value that is not an object', type(dataset).__name__,
                     'a COCO instances file is {"images": [...], "annotations": [...], "categories": [...]}')
        return report
    images = _check_keys(report, dataset.get('images', []), 'image',
                         {'id': 'int', 'file_name': 'name', 'width': 'positive', 'height': 'positive'},
                         'every image needs an integer id, its file_name under the image folder, width and height')
    categories = _check_keys(report, dataset.get('categories', []), 'category', {'id': 'int', 'name': 'name'},
                             'every category needs an integer id and a name')
    annotations = _check_keys(report, dataset.get('annotations', []), 'annotation',
                              {'id': 'key', 'image_id': 'key', 'category_id': 'key', 'bbox': 'any'},
                              'every annotation needs an id, image_id, category_id and bbox [x, y, width, height]')
    if report.errors:  # the checks below rely on every entry having its keys
        return report
    if not images:
        report.error('lists no image', '', 'nothing to evaluate, so no score' if evaluation else
                     'nothing to train on')
    if evaluation and images and not annotations:
        report.error('has images but no annotations', '', 'nothing to score in evaluation (COCO AP would be -1): '
                     'use the file with the ground truth')
    if not categories:
        report.error('lists no category', '', 'list the classes under "categories" ({"id": 1, "name": ...})')
    for what, items in (('image', images), ('annotation', annotations), ('category', categories)):
        repeated = sorted((i for i, n in Counter(item['id'] for item in items).items() if n > 1), key=str)
        for repeated_id in repeated:  # the readers index by id: one entry would silently take another's place
            report.error(f'{what} ids are used more than once', str(repeated_id), f'give every {what} its own id')
    for name in sorted(n for n, count in Counter(c['name'] for c in categories).items() if count > 1):
        report.error('category names are used more than once', repr(name), 'merge the categories or rename them')
    image_by_id = {im['id']: im for im in images}
    known = {c['id'] for c in categories}
    dangling, unknown, bad_box, no_area, bad_segmentation, dropped_polygons = set(), [], [], [], [], []
    for ann in annotations:
        where = f"annotation id {ann['id']} (image id {ann['image_id']})"
        image = image_by_id.get(ann['image_id'])
        if image is None:
            dangling.add(ann['image_id'])
            continue
        if ann['category_id'] not in known:
            unknown.append(f"{where}: category_id {ann['category_id']}")
        bbox = ann['bbox']
        if not (isinstance(bbox, list) and len(bbox) == 4 and _finite_numbers(bbox)):
            bad_box.append(f'{where}: {str(bbox)[:50]}')
            continue
        if not (bbox[2] > 0 and bbox[3] > 0):
            no_area.append(str(ann['id']))
        segmentation = ann.get('segmentation')
        crowd = ann.get('iscrowd', 0)
        if not segmentation:
            if mask_format is not None and not crowd:
                bad_segmentation.append((f'{where} has no segmentation ({segmentation!r})',
                                         'instance-mask training needs one for every non-crowd annotation'))
            continue
        if isinstance(segmentation, dict):
            problem = _rle_problem(segmentation, image['height'], image['width'])
            if not problem and mask_format == 'polygon' and not crowd:
                problem = 'an RLE segmentation, which polygon masks cannot hold: set INPUT.MASK_FORMAT bitmask'
        elif isinstance(segmentation, list):
            problem = _polygon_problem(segmentation)
            if not problem and any(not (isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0)
                                   for p in segmentation):
                dropped_polygons.append(str(ann['id']))
        else:
            problem = f'a segmentation that is neither polygons nor an RLE ({str(segmentation)[:40]})'
        if problem:
            bad_segmentation.append((f'{where} has {problem}',
                                     'polygons are [[x0, y0, x1, y1, x2, y2, ...]], an RLE {"size": [height, width], '
                                     '"counts": ...} of its image\'s size'))
    for image_id in sorted(dangling, key=str):
        report.error('image ids that annotations point to are not among its images', str(image_id),
                     'list those images, or drop the annotations')
    for entry in unknown:
        report.error("annotations have a category_id that is not among the file's categories", entry,
                     f'use one of the category ids {first_few(sorted(known), 10)}')
    for entry in bad_box:
        report.error('annotations have a bbox that is not 4 finite numbers', entry,
                     'write bbox as [x, y, width, height] in pixels')
    for entry, fix in bad_segmentation:
        report.error('annotations have an unusable segmentation', entry, fix)
    for ann_id in no_area:
        report.warn(f'of {len(annotations)} annotations have no box of positive width and height', ann_id,
                    'training leaves them out, evaluation keeps them as objects no detection can match')
    for ann_id in dropped_polygons:
        report.warn('annotations have polygons of fewer than 3 points besides usable ones', ann_id,
                    'the readers drop those polygons')
    if check_files:
        check_image_files(report, images, image_root, exif_transpose)
    if fill_areas and not report.errors:
        missing = [str(a['id']) for a in annotations if not _is_number(a.get('area'))]
        if missing:
            fill_missing_areas(dataset)
            for ann_id in missing:
                report.warn('annotations have no area', ann_id,
                            "filled in for this run as pycocotools computes it (the mask's pixels, else the box's "
                            'width x height); write it into the file to keep this quiet')
    return report


def check_image_files(report: Report, images: List[Mapping], image_root: str, exif_transpose: bool) -> None:
    """Files present, non-empty, of the json's size (headers only)."""
    reader = 'Detectron2 reads it turned' if exif_transpose else 'Deformable DETR (torchvision) reads it as stored'
    for image in images:
        path = os.path.join(image_root, image['file_name'])
        try:
            size = os.stat(path).st_size
        except OSError:
            report.error(f'of {len(images)} listed images are not in {image_root}', image['file_name'],
                         'put the files there, or fix file_name / the image folder')
            continue
        if size == 0:
            report.error('image files are empty (0 bytes)', image['file_name'], 'copy them again')
            continue
        found, orientation, why = header_size(path, exif_transpose)
        if found is None:
            report.warn('image files cannot be read', f'{image["file_name"]} ({why})',
                        'training leaves them out, evaluation refuses them: replace them')
            continue
        if orientation > 1:
            report.warn('images have an EXIF orientation', f'{image["file_name"]} ({orientation})',
                        f'{reader}; width and height must be those of the image as read')
        if found != (image['width'], image['height']):
            report.error('images have a width / height that is not the file\'s',
                         f'id {image["id"]} {image["file_name"]}: json {image["width"]}x{image["height"]}, '
                         f'file {found[0]}x{found[1]}' + (f' (EXIF orientation {orientation})' if orientation > 1
                                                          else ''),
                         'write the size of the image as read (EXIF orientation '
                         f'{"applied" if exif_transpose else "not applied"}) into width and height')


# ------------------------------------------------------------------------------------------ ImageFolder

def _image_files(folder: str) -> List[Tuple[str, int]]:
    """``(name, bytes)`` of the image files in ``folder`` (one ``scandir``: no second stat per file)."""
    with os.scandir(folder) as entries:
        return sorted((e.name, e.stat().st_size) for e in entries
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())


def check_imagefolder(root: str, splits: Sequence[str] = ('train', 'val')) -> Report:
    """Every problem of an ImageFolder dataset ``root/<split>/<class>/<image>``: missing splits, empty class
    folders and splits whose class folders differ (the labels would mean other classes) are errors; empty
    files are warned about (the loaders leave unreadable images out)."""
    report = Report(root, f'python -m mpvit.check_data imagefolder {root}')
    classes: Dict[str, List[str]] = {}
    for split in splits:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            report.error('split folders are missing', folder, f'put the {split} images under {folder}/<class>/')
            continue
        classes[split] = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        if not classes[split]:
            report.error('split folders have no class folders', folder, 'one folder per class, images inside')
        for name in classes[split]:
            files = _image_files(os.path.join(folder, name))
            if not files:
                report.error('class folders have no image', f'{split}/{name}',
                             f'add images ({", ".join(IMAGE_EXTENSIONS)}) or remove the folder')
            for file, size in files:
                if size == 0:  # unreadable, as round two's loaders treat any unreadable image
                    report.warn('image files are empty (0 bytes)', f'{split}/{name}/{file}',
                                'training leaves them out, evaluation counts them as skipped: copy them again')
    if len(classes) == len(splits) and len({tuple(c) for c in classes.values()}) > 1:
        first, *others = splits
        for other in others:
            only_first = sorted(set(classes[first]) - set(classes[other]))
            only_other = sorted(set(classes[other]) - set(classes[first]))
            if only_first or only_other:
                report.error(f'{first}/ and {other}/ class sets differ', f'only in {first}/ [{first_few(only_first)}], '
                             f'only in {other}/ [{first_few(only_other)}]',
                             'give both splits the same class folders (the label is the folder\'s sorted index)')
    return report


# ------------------------------------------------------------------------------------------ segmentation

_INDEX_MODES = ('L', 'P', 'I', 'I;16')  # one value per pixel: a class index


def _mask_values(mask: Any) -> List[int]:
    """The distinct values of a mask array (a bincount for 8-bit masks: ADE20K's 20k are read in ~4 ms each)."""
    if mask.dtype == np.uint8:
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()
    return np.unique(mask).tolist()


def check_segmentation(image_dir: str, mask_dir: str, num_classes: int, *, ignore_index: int = 255,
                       reduce_zero_label: bool = False, image_suffix: str = '.jpg',
                       mask_suffix: str = '.png') -> Report:
    """Every problem of a segmentation set (image ``X{image_suffix}`` with mask ``X{mask_suffix}``): missing
    masks, masks of another size than their image, RGB masks where index maps belong, and label values
    outside ``0..num_classes-1`` and ``ignore_index`` (with ``reduce_zero_label``, as mmseg: raw 0 is ignored
    and 1..num_classes are the classes)."""
    report = Report(mask_dir, f'python -m mpvit.check_data segmentation {image_dir} {mask_dir} '
                              f'--classes {num_classes}')
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise MissingFileError(f'segmentation data: {folder} does not exist')
    images = sorted(f for f in os.listdir(image_dir) if f.endswith(image_suffix))
    if not images:
        report.error(f'no *{image_suffix} image in {image_dir}', '', 'nothing to check or train on')
    valid = set(range(1, num_classes + 1)) | {0} if reduce_zero_label else set(range(num_classes))
    valid.add(ignore_index)
    for name in images:
        stem = name[:-len(image_suffix)]
        mask_path = os.path.join(mask_dir, stem + mask_suffix)
        if not os.path.isfile(mask_path):
            report.error('images have no mask', stem + mask_suffix, f'write a mask for each image into {mask_dir}')
            continue
        size, _, why = header_size(os.path.join(image_dir, name), exif_transpose=False)
        try:
            with Image.open(mask_path) as mask:
                mode, mask_size = mask.mode, mask.size
                values = _mask_values(np.asarray(mask)) if mode in _INDEX_MODES else None
        except OSError as e:
            report.error('masks cannot be read', f'{stem + mask_suffix} ({" ".join(str(e).split())})',
                         'write them again as 8-bit PNG index maps')
            continue
        if size is None:
            report.warn('images cannot be read', f'{name} ({why})',
                        'training leaves them out, evaluation refuses them: replace them')
        elif size != mask_size:
            report.error('masks are not of their image\'s size', f'{stem + mask_suffix}: {mask_size[0]}x'
                         f'{mask_size[1]}, image {size[0]}x{size[1]}', 'write each mask at its image\'s size')
        if values is None:
            report.error(f'masks have {mode} pixels, not class indices', stem + mask_suffix,
                         'write one class index per pixel (8-bit grey or palette PNG), not colours')
            continue
        outside = sorted(int(v) for v in values if int(v) not in valid)
        if outside:
            report.error('masks have label values outside the classes and the ignore index',
                         f'{stem + mask_suffix}: {first_few(outside, 5)}',
                         f'labels are {"1" if reduce_zero_label else "0"}..'
                         f'{num_classes if reduce_zero_label else num_classes - 1} and {ignore_index} (ignored)' +
                         (', with raw 0 ignored (reduce_zero_label)' if reduce_zero_label else ''))
    return report


# ------------------------------------------------------------------------------------------------ command

def read_coco_file(path: str) -> Any:
    """``json.load`` of an annotation file, a missing or malformed file named in one line."""
    import json

    if not os.path.isfile(path):
        raise MissingFileError(f'{path} does not exist')
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f'{path}: not valid JSON ({e})') from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m mpvit.check_data', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--show', type=int, default=10, help='entries listed per kind of problem (0: all)')
    formats = parser.add_subparsers(dest='format', required=True)
    coco = formats.add_parser('coco', help='a COCO instances json and its image folder')
    coco.add_argument('annotations')
    coco.add_argument('images')
    coco.add_argument('--for', dest='framework', choices=('detectron2', 'deformable_detr'), default='detectron2',
                      help='whose reader: Detectron2 applies EXIF orientation, Deformable DETR does not')
    coco.add_argument('--eval', action='store_true', help='the file is scored: it needs annotations')
    coco.add_argument('--masks', choices=('polygon', 'bitmask'), help='instance masks are trained (Mask R-CNN)')
    folder = formats.add_parser('imagefolder', help='DIR/{train,val}/<class>/<image>')
    folder.add_argument('root')
    folder.add_argument('--splits', nargs='+', default=['train', 'val'])
    seg = formats.add_parser('segmentation', help='an image folder and its folder of index-map masks')
    seg.add_argument('images')
    seg.add_argument('masks')
    seg.add_argument('--classes', type=int, required=True, help='number of classes')
    seg.add_argument('--ignore-index', type=int, default=255)
    seg.add_argument('--reduce-zero-label', action='store_true', help='raw 0 is ignored, 1..N are the classes '
                     '(ADE20K)')
    seg.add_argument('--image-suffix', default='.jpg')
    seg.add_argument('--mask-suffix', default='.png')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print every problem (errors, then warnings) and a summary; 1 if there are errors, else 0."""
    import time

    from mpvit.training import user_errors_in_one_line

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    with user_errors_in_one_line():
        if args.format == 'coco':
            dataset = read_coco_file(args.annotations)
            report = check_coco(dataset, args.annotations, args.images, evaluation=args.eval,
                                exif_transpose=args.framework == 'detectron2', mask_format=args.masks)
            counted = {k: len(dataset.get(k) or []) for k in ('images', 'annotations', 'categories')} \
                if isinstance(dataset, dict) else {}
        elif args.format == 'imagefolder':
            report, counted = check_imagefolder(args.root, args.splits), {}
        else:
            report = check_segmentation(args.images, args.masks, args.classes, ignore_index=args.ignore_index,
                                        reduce_zero_label=args.reduce_zero_label, image_suffix=args.image_suffix,
                                        mask_suffix=args.mask_suffix)
            counted = {}
    for line in report.lines(args.show):
        print(line)
    seconds = time.perf_counter() - start
    sizes = ''.join(f', {n} {k}' for k, n in counted.items())
    errors = sum(len(f.entries) for f in report.errors.values())
    warnings = sum(len(f.entries) for f in report.warnings.values())
    print(f'{report.source}: {"FAILED" if errors else "ok"}: {errors} errors, {warnings} warnings{sizes} '
          f'({seconds:.1f} s)')
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
