"""MPViT: Multi-Path Vision Transformer. Importing this package registers the
``mpvit_tiny`` / ``mpvit_xsmall`` / ``mpvit_small`` / ``mpvit_base`` timm models."""
from .checkpoint import CheckpointError, checkpoint_filter_fn, load_backbone_weights, read_checkpoint
from .errors import UserError
from .models import BATCH_PATHS, MPVIT_ARCHS, MPViT, set_batch_paths, set_fast_ops

__version__ = '0.1.0'
__all__ = [
    'BATCH_PATHS', 'MPViT', 'MPVIT_ARCHS', 'CheckpointError', 'checkpoint_filter_fn', 'load_backbone_weights',
    'read_checkpoint', 'set_batch_paths', 'set_fast_ops', 'UserError',
]
