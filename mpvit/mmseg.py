"""MPViT as an mmsegmentation 1.x backbone (``type='MPViT'`` in a config).

Importing this module registers the backbone with ``mmseg.registry.MODELS`` (and the
label check :class:`mpvit.mmseg_transforms.CheckSegMap` with ``TRANSFORMS``);
configs do it with ``custom_imports = dict(imports=['mpvit.mmseg'])``.

It also makes mmengine read every checkpoint (``load_from``, ``--resume``, ``init_cfg``
of any module; local files, URLs, and its ``torchvision://`` / ``open-mmlab://`` / ``s3://``
... schemes) without running code from it: local files and URLs through
:func:`mpvit.checkpoint.read_checkpoint` (URLs found in the weights directory first), and
mmengine's two readers underneath its other schemes replaced by safe ones. mmengine's own
reader falls back to full unpickling when its allowlist refuses a file.

The backbone *is* the core model (a subclass, not a wrapper), so a segmentor's
``backbone.*`` keys are the classification checkpoint's keys, as in the
released UperNet checkpoints.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import mmengine
import mmengine.runner.checkpoint as mmengine_checkpoint
import torch
from mmcv.cnn import build_norm_layer
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmengine.runner.checkpoint import CheckpointLoader
from mmengine.utils import apply_to
from mmseg.registry import HOOKS, MODELS
from torch.nn.modules.batchnorm import _BatchNorm

import mpvit.mmseg_transforms  # noqa: F401  (registers CheckedLoadImage, CheckSegMap)
from mpvit.checkpoint import load_backbone_weights, read_checkpoint
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import check_some_readable
from mpvit.models.mpvit import MPViT as _MPViT
from mpvit.models.mpvit import mpvit_arch
from mpvit.serialization import safe_load_stream
from mpvit.training import LossWatch


def _on_device(checkpoint: Any, map_location: Any) -> Any:
    """Tensors read on the CPU, moved to ``map_location`` if it names a device (a callable one is left to
    mmengine's own moves)."""
    if isinstance(map_location, (str, torch.device)) and str(map_location) != 'cpu':
        checkpoint = apply_to(checkpoint, lambda x: isinstance(x, torch.Tensor), lambda t: t.to(map_location))
    return checkpoint


def _load_without_code(filename: str, map_location: Any = None) -> Any:
    """mmengine's checkpoint loader for local files, URLs and ``hf-hub:`` ids."""
    return _on_device(read_checkpoint(filename), map_location)


def _safe_torch_load(file: Any, map_location: Any = None, weights_only: Any = None) -> Any:
    """Stands in for mmengine's ``_safe_torch_load`` (which falls back to full unpickling) under its
    other schemes: a path as any checkpoint here, a stream (s3, petrel) by the same allowlist."""
    if isinstance(file, (str, os.PathLike)):
        return _on_device(read_checkpoint(os.fspath(file)), map_location)
    return _on_device(safe_load_stream(file), map_location)


def _load_url(url: str, model_dir: Any = None, map_location: Any = None, progress: bool = True,
              check_hash: bool = False, file_name: Any = None) -> Any:
    """Stands in for mmengine's ``load_url`` (torch.hub's, full unpickling) under ``torchvision://``,
    ``open-mmlab://``, ``mmcls://`` ...: the URL is found or downloaded as every other one."""
    return _on_device(read_checkpoint(url), map_location)


def _make_mmengine_safe() -> None:
    for name, safe in (('_safe_torch_load', _safe_torch_load), ('load_url', _load_url)):
        if not callable(getattr(mmengine_checkpoint, name, None)):  # fail loudly if mmengine changes
            raise ImportError(f'mmengine {mmengine.__version__} has no mmengine.runner.checkpoint.{name}: '
                              'mpvit.mmseg cannot make its checkpoint reading safe; use the mmengine version '
                              'of requirements.txt')
        setattr(mmengine_checkpoint, name, safe)
    CheckpointLoader.register_scheme(prefixes=('', 'http://', 'https://', 'hf-hub:'), loader=_load_without_code,
                                     force=True)


_make_mmengine_safe()


@HOOKS.register_module()
class StopOnNonFiniteLoss(Hook):
    """The drivers' divergence rule (:class:`mpvit.training.LossWatch`) for mmengine: stop at the first
    non-finite loss (all processes together), in one line naming the iteration and the last finite loss,
    before any checkpoint of the diverged weights is written (runs ahead of ``CheckpointHook``, and checks
    the weights of every checkpoint). The configs' ``custom_hooks``."""

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
class CheckTrainingImages(Hook):
    """Before training: refuse a training set of which no image can be read (mmengine would otherwise leave
    out image after image, then fail without naming one). Reads one image of a usable set."""

    def before_train(self, runner) -> None:
        dataset = runner.train_dataloader.dataset
        paths = (dataset.get_data_info(i)['img_path'] for i in range(len(dataset)))
        check_some_readable(paths, f"training set {dataset.data_prefix.get('img_path', dataset.data_root)}")


@MODELS.register_module(name='MPViT')
class MMSegMPViT(_MPViT, BaseModule):
    """MPViT backbone returning the stage maps at ``out_indices`` (strides 4, 8, 16, 32).

    Args:
        arch: 'tiny' | 'xsmall' | 'small' | 'base', or a dict of MPViT's own arguments
            (``num_path``, ``num_layers``, ``embed_dims``, ``mlp_ratio``).
        out_indices: stages to return.
        drop_path_rate: stochastic depth.
        norm_cfg: mmcv norm config for the conv paths (BN / SyncBN / GN ...).
        norm_eval: keep BN layers in eval mode (frozen statistics) while training.
        fast_ops: False builds the textbook ops, what FLOP counting needs
            (``get_flops.py ... --cfg-options model.backbone.fast_ops=False``).
        init_cfg: ``dict(type='Pretrained', checkpoint=PATH_OR_URL)`` takes a classification checkpoint
            or a released segmentation / detection checkpoint (its backbone part), read by
            :func:`mpvit.checkpoint_filter_fn`.
    """

    def __init__(
            self,
            arch: Union[str, Dict] = 'small',
            out_indices: Sequence[int] = (0, 1, 2, 3),
            drop_path_rate: float = 0.,
            norm_cfg: Optional[Dict] = None,
            norm_eval: bool = False,
            in_channels: int = 3,
            fast_ops: bool = True,
            init_cfg: Optional[Dict] = None,
    ):
        if isinstance(arch, str):
            arch = mpvit_arch(arch)
        norm_cfg = dict(norm_cfg or dict(type='BN', requires_grad=True))
        super().__init__(
            **arch, in_chans=in_channels, num_classes=0, global_pool='', drop_path_rate=drop_path_rate,
            norm_layer=lambda channels: build_norm_layer(norm_cfg, channels)[1], fast_ops=fast_ops,
        )
        self.init_cfg = init_cfg
        self._is_init = False
        num_stages = len(self.mhca_stages)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise InvalidInputError(f'out_indices {tuple(out_indices)} must be stage indices in 0..{num_stages - 1}')
        self.out_indices = tuple(out_indices)
        self.norm_eval = norm_eval

    def init_weights(self) -> None:
        if self.init_cfg and self.init_cfg.get('type') == 'Pretrained':
            checkpoint = self.init_cfg['checkpoint']
            print_log(f'MPViT: loading backbone weights from {checkpoint}', logger='current')
            load_backbone_weights(self, checkpoint)
            self._is_init = True
        else:
            BaseModule.init_weights(self)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True))

    def train(self, mode: bool = True) -> MMSegMPViT:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    @property
    def out_channels(self) -> List[int]:
        return [self.feature_info[i]['num_chs'] for i in self.out_indices]


def load_run_config(config: str, launcher: str = 'none', cfg_options: Optional[Dict] = None,
                    work_dir: Optional[str] = None) -> Config:
    """A config as mmseg's train / test tools read it: ``--cfg-options`` merged, the launcher set, and the
    work dir from ``--work-dir``, the config, or ``work_dirs/<config name>`` (in that order)."""
    if not osp.isfile(config):
        raise MissingFileError(f'config file not found: {config}')
    try:
        cfg = Config.fromfile(config)
    except SyntaxError as e:  # raised by mmengine for the config or a _base_ file, which it does not name
        where = f' (line {e.lineno})' if e.lineno else ''
        raise InvalidInputError(f'{config} (or a file it inherits) is not valid Python{where}: {e.msg or e}') from None
    cfg.launcher = launcher
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend')
    if launcher != 'none' and backend == 'nccl' and not torch.cuda.is_available():
        raise InvalidInputError(f'--launcher {launcher}: env_cfg.dist_cfg.backend is nccl, which needs CUDA GPUs, and '
                                'this machine has none (--cfg-options env_cfg.dist_cfg.backend=gloo runs on CPU)')
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join('work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg
