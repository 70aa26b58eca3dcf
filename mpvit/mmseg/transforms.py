"""Checked loading for mmsegmentation pipelines, registered on import.

``CheckedLoadImage`` reads images with the drivers' one rule for unreadable files (training leaves
one out, named in a warning; evaluation refuses it in one line) instead of an ``AssertionError``.
``CheckSegMap`` goes right after ``LoadAnnotations``: without it a bad label PNG fails much later
with a message that names no file (a shape mismatch inside the loss, "Target 199 is out of bounds")
or, in validation, silently gives a wrong mIoU.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from mmcv.transforms import BaseTransform, LoadImageFromFile
from mmseg.registry import TRANSFORMS

from mpvit.errors import InvalidInputError, first_few
from mpvit.images import decode_error, unreadable_error, warn_unreadable


@TRANSFORMS.register_module()
class CheckedLoadImage(LoadImageFromFile):
    """``LoadImageFromFile`` for a file that cannot be decoded (missing, truncated, not an image):
    ``unreadable='leave_out'`` (training) returns ``None``, on which mmengine's dataset takes another
    image, with a warning naming the file; ``'refuse'`` (evaluation) raises one line naming it.

    Args:
        unreadable: ``'leave_out'`` | ``'refuse'``.
        **kwargs: ``LoadImageFromFile``'s own arguments.
    """

    def __init__(self, unreadable: str = 'refuse', **kwargs):
        if unreadable not in ('leave_out', 'refuse'):
            raise InvalidInputError(f"CheckedLoadImage: unreadable={unreadable!r}, expected 'leave_out' or 'refuse'")
        super().__init__(**kwargs)
        self.leave_out, self.left_out = unreadable == 'leave_out', 0

    def transform(self, results: Dict) -> Optional[Dict]:
        path = results['img_path']
        try:
            return super().transform(results)
        except (AssertionError, OSError) as e:  # mmcv asserts on an image cv2 cannot decode
            # Only a file that cannot be decoded is handled; anything else keeps its traceback.
            error = decode_error(path) or (e if isinstance(e, AssertionError) and str(path) in str(e) else None)
            if error is None:
                raise
        if not self.leave_out:
            raise unreadable_error(path, error) from None
        self.left_out += 1
        warn_unreadable(path, error, self.left_out)
        return None


@TRANSFORMS.register_module()
class CheckSegMap(BaseTransform):
    """Refuse a label map that is not one channel, not the image's size, or holds values outside
    ``0 .. num_classes - 1`` and ``ignore_index``; the message names the file.

    Args:
        num_classes: classes of the dataset (150 for ADE20K).
        ignore_index: the label value the loss and metric ignore.

    The train / test tools set both from the pipeline's dataset (``fit_to_data`` of
    ``mpvit/mmseg/run_config.py``), so the check follows the data's own classes whatever
    the config wrote here.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def transform(self, results: Dict) -> Dict:
        if 'gt_seg_map' not in results:  # inference: mmseg drops LoadAnnotations
            return results
        label, path = results['gt_seg_map'], results.get('seg_map_path')
        if label.ndim != 2:
            raise InvalidInputError(f'label {path} has {label.shape[2]} channels: label maps are single-channel '
                                    'PNGs of class indices (mode L or P), not colour images')
        image_hw, label_hw = tuple(results['ori_shape'][:2]), tuple(label.shape)
        if image_hw != label_hw:
            raise InvalidInputError(f"label {path} is {label_hw[1]}x{label_hw[0]} but image "
                                    f"{results.get('img_path')} is {image_hw[1]}x{image_hw[0]} (width x height)")
        values = np.unique(label)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index)]
        if bad.size:
            stored = bad + 1 if results.get('reduce_zero_label') else bad  # as written in the PNG
            listing = first_few(stored.tolist())
            valid = f'1..{self.num_classes}, 0 = ignored' if results.get('reduce_zero_label') else \
                f'0..{self.num_classes - 1}, {self.ignore_index} = ignored'
            raise InvalidInputError(f'label {path} holds values {listing} outside the {self.num_classes} classes '
                                    f'(valid: {valid})')
        return results
