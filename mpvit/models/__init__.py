from .mpvit import MPVIT_ARCHS, MPViT, checkpoint_filter_fn, fold_batchnorm, mpvit_arch, set_batch_paths, set_fast_ops

__all__ = ['MPViT', 'MPVIT_ARCHS', 'checkpoint_filter_fn', 'fold_batchnorm', 'mpvit_arch', 'set_batch_paths',
           'set_fast_ops']
