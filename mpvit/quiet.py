"""Known, harmless messages of our dependencies, silenced in this repository's commands.

The drivers import this module before anything else (``import mpvit.quiet``; ruff's
isort keeps it first), which ignores :data:`DEPENDENCY_WARNINGS` in their process.
The rest of the library never changes a user's warning filters. Each entry says why
the message does not concern a user of these commands; the test suite filters the
same warnings (``pyproject.toml``), so that what is left there is ours to fix.
"""
from __future__ import annotations

import warnings
from typing import Tuple, Type

__all__ = ['DEPENDENCY_WARNINGS', 'silence_dependency_noise']

# (category, message regex, why it is harmless here)
DEPENDENCY_WARNINGS: Tuple[Tuple[Type[Warning], str, str], ...] = (
    (FutureWarning, r'`torch\.jit\.script` is deprecated',
     'fvcore and Detectron2 script small helper functions when imported; nothing here depends on it'),
    (UserWarning, r'Fail to import ``MultiScaleDeformableAttention``',
     "mmcv without compiled ops (the pure onedl-mmcv wheel): MPViT and UperNet use none of them"),
    (UserWarning, r'Default ``avg_non_ignore`` is False',
     "the authors' UperNet recipe averages the loss over every pixel, mmseg's default, on purpose"),
    (UserWarning, r'torch\.meshgrid: in an upcoming release',
     "Detectron2's anchor generator calls torch.meshgrid without indexing=; its result is the one it wants"),
    (FutureWarning, r'Importing from timm\.models\.registry is deprecated',
     "the authors' model file, which dev/benchmark.py times side by side, imports it"),
)


def silence_dependency_noise() -> None:
    """Ignore :data:`DEPENDENCY_WARNINGS` in this process (done when this module is imported)."""
    for category, message, _ in DEPENDENCY_WARNINGS:
        warnings.filterwarnings('ignore', message=message, category=category)


silence_dependency_noise()
