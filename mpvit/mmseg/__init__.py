"""MPViT on mmsegmentation 1.x, split by role as mmseg projects are: ``backbone`` (``type='MPViT'``),
``transforms`` (``CheckedLoadImage``, ``CheckSegMap``), ``hooks`` (``StopOnNonFiniteLoss``, ``CheckLoadedWeights``,
``CheckTrainingImages``), ``metrics`` (``CheckedIoUMetric``) and ``checkpoint`` (mmengine's checkpoint
reading made safe, :func:`load_segmentor_weights`).

Importing the package registers all of them with mmseg's registries and makes mmengine's checkpoint reading
safe; configs do it with ``custom_imports = dict(imports=['mpvit.mmseg'])``. The drivers' config handling
(data options, classes checked against the heads) is :mod:`mpvit.mmseg.run_config`, which this package does
not import.
"""
import contextlib
import io
import sys
from typing import Iterator, TextIO


class _DropLine(io.TextIOBase):
    """A text stream passing everything to ``target`` except the lines equal to ``line``."""

    def __init__(self, target: TextIO, line: str):
        self.target, self.line, self.pending = target, line, ''

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split('\n')
        for line in lines:
            if line.strip() != self.line:
                self.target.write(line + '\n')
        return len(text)

    def flush(self) -> None:
        if self.pending and self.pending.strip() != self.line:
            self.target.write(self.pending)
        self.pending = ''
        self.target.flush()


@contextlib.contextmanager
def _without_printed_line(line: str) -> Iterator[None]:
    """Drop ``line`` from what is printed to stdout inside the block (a dependency's stray print at import)."""
    stream = _DropLine(sys.stdout, line)
    try:
        with contextlib.redirect_stdout(stream):
            yield
    finally:
        stream.flush()


# mmseg prints (not logs: mmengine's print_log without a logger prints even a DEBUG message) "Could not import
# OneDL" when its datasets are first imported, mid-run: an optional dataset package is absent, which nothing
# here uses. Imported now, without that line.
with _without_printed_line('Could not import OneDL'):
    import mmseg.datasets  # noqa: F401, E402

from mpvit.mmseg.backbone import MMSegMPViT, resolve_arch  # noqa: E402
from mpvit.mmseg.checkpoint import load_segmentor_weights  # noqa: E402
from mpvit.mmseg.hooks import (  # noqa: E402
    AlignGradientStrides,
    CheckLoadedWeights,
    CheckTrainingImages,
    StopOnNonFiniteLoss,
)
from mpvit.mmseg.metrics import CheckedIoUMetric  # noqa: E402
from mpvit.mmseg.transforms import CheckedLoadImage, CheckSegMap  # noqa: E402

__all__ = [
    'AlignGradientStrides', 'CheckLoadedWeights', 'CheckSegMap', 'CheckTrainingImages', 'CheckedIoUMetric',
    'CheckedLoadImage', 'MMSegMPViT', 'StopOnNonFiniteLoss', 'load_segmentor_weights', 'resolve_arch',
]
