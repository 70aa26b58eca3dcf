"""The configs' mmengine hooks (``custom_hooks``), registered with ``mmseg.registry.HOOKS`` on import:
the drivers' divergence rule, weights that are no usable weights (``load_from``, ``--resume``) and a
training set that cannot be read, each stopped in one line."""
from __future__ import annotations

from typing import Any, Dict

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from mpvit.checkpoint import check_usable, unwrap_checkpoint
from mpvit.images import check_some_readable
from mpvit.mmseg.checkpoint import last_read
from mpvit.training import LossWatch, align_gradient_strides


@HOOKS.register_module()
class StopOnNonFiniteLoss(Hook):
    """The drivers' divergence rule (:class:`mpvit.training.LossWatch`) for mmengine: stop at the first
    non-finite loss (all processes together), in one line naming the iteration and the last finite loss,
    before any checkpoint of the diverged weights is written (runs ahead of ``CheckpointHook``, and checks
    the weights of every checkpoint)."""

    priority = 'VERY_HIGH'

    def __init__(self) -> None:
        self.watch = LossWatch()

    def after_train_iter(self, runner, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
        loss = (outputs or {}).get('loss')
        if loss is not None:
            self.watch.check(loss, f'iteration {runner.iter + 1}')

    def before_save_checkpoint(self, runner, checkpoint: Dict) -> None:
        # A finite loss may still have been followed by a step that made the weights non-finite.
        where = f"iteration {checkpoint.get('meta', {}).get('iter', runner.iter)}"
        self.watch.check_weights(checkpoint.get('state_dict', {}), where)


@HOOKS.register_module()
class CheckLoadedWeights(Hook):
    """``load_from`` / ``--resume``: refuse a checkpoint whose weights are not finite, hold no data or are
    integers where the model has floats (:func:`mpvit.checkpoint.check_usable`), before mmengine copies
    them into the model (its ``load_state_dict`` would cast them silently)."""

    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: Dict) -> None:
        model = getattr(runner.model, 'module', runner.model)
        check_usable(unwrap_checkpoint(checkpoint), model.state_dict(), last_read() or 'the loaded checkpoint')


@HOOKS.register_module()
class CheckTrainingImages(Hook):
    """Before training: refuse a training set of which no image can be read (mmengine would otherwise leave
    out image after image, then fail without naming one). Reads one image of a usable set."""

    def before_train(self, runner) -> None:
        dataset = runner.train_dataloader.dataset
        paths = (dataset.get_data_info(i)['img_path'] for i in range(len(dataset)))
        check_some_readable(paths, f"training set {dataset.data_prefix.get('img_path', dataset.data_root)}")


@HOOKS.register_module()
class AlignGradientStrides(Hook):
    """Before distributed training: :func:`mpvit.training.align_gradient_strides` on the model DDP wraps (the
    segmentor reads MPViT's channels-last maps; DDP would warn and copy with strided reads). The configs'
    ``custom_hooks``; nothing to do in a single process."""

    def before_train(self, runner) -> None:
        model = getattr(runner.model, 'module', None)
        if model is not None:  # wrapped: MMDistributedDataParallel
            align_gradient_strides(model)
