"""One way to read images in every driver: 16-bit files scaled to 8 bits, unreadable files named.

PIL's ``convert('RGB')`` clips a 16-bit grey PNG (mode ``I;16`` / ``I``) at 255, which turns an ordinary
16-bit picture all white; :func:`open_rgb` keeps its high byte instead. The training loaders leave an
unreadable image out with a warning naming it (:func:`warn_unreadable`), evaluation refuses it in one
line, and :func:`check_some_readable` finds a set of which no image reads before any work starts.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import numpy as np
from PIL import Image

from mpvit.errors import InvalidInputError

__all__ = ['HIGH_DEPTH_MODES', 'check_some_readable', 'decode_error', 'is_high_depth', 'open_rgb', 'unreadable_error',
           'warn_unreadable']

_logger = logging.getLogger('mpvit.data')

# Grey images of more than 8 bits per pixel (16-bit PNG / TIFF): values up to 65535.
HIGH_DEPTH_MODES = frozenset({'I;16', 'I;16B', 'I;16L', 'I;16N', 'I'})


def is_high_depth(path: str | os.PathLike) -> bool:
    """Whether the image at ``path`` is 16-bit grey (reads the header only)."""
    with Image.open(path) as image:
        return image.mode in HIGH_DEPTH_MODES


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as 8-bit RGB; a 16-bit grey one is scaled (its high byte), not clipped."""
    with Image.open(path) as image:
        if image.mode in HIGH_DEPTH_MODES:
            values = np.asarray(image).astype(np.uint32)
            return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), 'L').convert('RGB')
        return image.convert('RGB')


def warn_unreadable(path: str | os.PathLike, err: BaseException, count: int) -> None:
    """The training loaders' one warning per image left out (``count``: this process's so far)."""
    _logger.warning('leaving out unreadable image %s (%s); %d left out so far in this process',
                    path, ' '.join(str(err).split()) or type(err).__name__, count)


def unreadable_error(path: str | os.PathLike, err: BaseException) -> InvalidInputError:
    """What evaluation raises for an unreadable image: leaving it out would change the metric's images."""
    return InvalidInputError(f'unreadable image {path} ({" ".join(str(err).split()) or type(err).__name__}); '
                             'evaluation needs every image of the set')


def decode_error(path: str | os.PathLike, high_depth: bool = True) -> OSError | None:
    """Why the image at ``path`` cannot be decoded (``None`` if it can): the check the loaders make after a
    read failed, so that only an unreadable file is left out and any other error keeps its traceback.
    ``high_depth=False``: a 16-bit grey image counts as unreadable (for readers that would clip it)."""
    try:
        with Image.open(path) as image:
            if not high_depth and image.mode in HIGH_DEPTH_MODES:
                return OSError('a 16-bit grey image, which this reader would clip to white: convert it to 8 bits')
            image.load()
        return None
    except OSError as e:  # missing, PIL's UnidentifiedImageError, truncated files
        return e


def check_some_readable(paths: Iterable[str | os.PathLike], what: str, high_depth: bool = True) -> None:
    """Raise :class:`InvalidInputError` when not one of ``paths`` can be decoded (stops at the first that can:
    for a usable set this reads one image). ``high_depth``: as for :func:`decode_error`."""
    first, count = None, 0
    for path in paths:
        count += 1
        error = decode_error(path, high_depth)
        if error is None:
            return
        first = first or f'{path}: {" ".join(str(error).split())}'
    if count:
        raise InvalidInputError(f'{what}: none of its {count} images can be read (first: {first})')
