from ..checkpoint import checkpoint_filter_fn
from .batched_paths import BATCH_PATHS, set_batch_paths
from .entrypoints.mpvit import default_cfgs  # noqa: F401  (registers mpvit_tiny / xsmall / small / base with timm)
from .mpvit import MPVIT_ARCHS, MPViT, fold_batchnorm, mpvit_arch, set_fast_ops

__all__ = ['BATCH_PATHS', 'MPViT', 'MPVIT_ARCHS', 'checkpoint_filter_fn', 'fold_batchnorm', 'mpvit_arch',
           'set_batch_paths', 'set_fast_ops']
