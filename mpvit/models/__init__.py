from ..checkpoint import checkpoint_filter_fn
from .batched_paths import BATCH_PATHS, set_batch_paths
from .entrypoints.mpvit import default_cfgs  # noqa: F401  (registers mpvit_tiny / xsmall / small / base with timm)
from .features import MPViTFeatures, create_features
from .mpvit import MPVIT_ARCHS, MPViT, fold_batchnorm, mpvit_arch, set_fast_ops

__all__ = ['BATCH_PATHS', 'MPViT', 'MPVIT_ARCHS', 'MPViTFeatures', 'checkpoint_filter_fn', 'create_features',
           'fold_batchnorm', 'mpvit_arch', 'set_batch_paths', 'set_fast_ops']
