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
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

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
from mmseg.evaluation.metrics import IoUMetric
from mmseg.registry import DATASETS, HOOKS, METRICS, MODELS
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


@METRICS.register_module()
class CheckedIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric``, plus a warning when most of the classes have no labelled pixel in the evaluated
    set: the sign of labels of another dataset than the config's classes (3-class labels under the 150 ADE20K
    classes gave mIoU 0 with 148 NaN rows, and no word). Adds ``classes_without_labels`` to the metrics."""

    def compute_metrics(self, results: list) -> Dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only or not results:
            return metrics
        labelled = sum(result[3] for result in results)  # pixels of each class in the labels
        absent = [name for name, count in zip(self.dataset_meta['classes'], labelled.tolist()) if count == 0]
        metrics['classes_without_labels'] = len(absent)
        if len(absent) * 2 > len(labelled):
            print_log(f'{len(absent)} of {len(labelled)} classes have no labelled pixel in the {len(results)} '
                      f'evaluated images (e.g. {", ".join(map(str, absent[:5]))}): are these labels of the '
                      "dataset the config's classes describe? mIoU averages the classes present only "
                      '(see semantic_segmentation/README.md, "Your own data")', logger='current', level=30)
        return metrics


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
    """A config as mmseg's train / test tools read it: ``--cfg-options`` merged (the data's top-level keys
    applied everywhere, :func:`apply_data_options`), checked against its data (:func:`fit_to_data`), the
    launcher set, and the work dir from ``--work-dir``, the config, or ``work_dirs/<config name>`` (in that
    order)."""
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
        apply_data_options(cfg, cfg_options)
    fit_to_data(cfg)
    backend = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('backend')
    if launcher != 'none' and backend == 'nccl' and not torch.cuda.is_available():
        raise InvalidInputError(f'--launcher {launcher}: env_cfg.dist_cfg.backend is nccl, which needs CUDA GPUs, and '
                                'this machine has none (--cfg-options env_cfg.dist_cfg.backend=gloo runs on CPU)')
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join('work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


# The data's own keys (top level of configs/semantic_segmentation/_base_/datasets/*.py): on the command line
# they mean every dataloader, as in the file, where a dataset copy per dataloader is taken at parse time.
DATA_OPTIONS = ('data_root', 'classes', 'palette', 'reduce_zero_label', 'ignore_index')
_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
_HEADS = ('decode_head', 'auxiliary_head')


def _datasets(dataset: Any) -> Iterator[Dict]:
    """The datasets (with pipelines) of a dataloader's ``dataset`` config, through wrappers
    (``RepeatDataset``'s ``dataset``, ``ConcatDataset``'s ``datasets``)."""
    if not isinstance(dataset, dict):
        return
    if isinstance(dataset.get('dataset'), dict):
        yield from _datasets(dataset['dataset'])
    elif isinstance(dataset.get('datasets'), (list, tuple)):
        for inner in dataset['datasets']:
            yield from _datasets(inner)
    else:
        yield dataset


def _loader_datasets(cfg: Config) -> Iterator[Tuple[str, Dict]]:
    for loader in _LOADERS:
        for dataset in _datasets((cfg.get(loader) or {}).get('dataset')):
            yield loader, dataset


def _heads(cfg: Config) -> Iterator[Tuple[str, Dict]]:
    """``(config key, head config)`` of the decode and auxiliary heads (the latter may be a list)."""
    for name in _HEADS:
        head = cfg.model.get(name)
        heads = head if isinstance(head, (list, tuple)) else [head]
        for i, one in enumerate(heads):
            if isinstance(one, dict):
                yield (f'model.{name}' if len(heads) == 1 else f'model.{name}.{i}'), one


def _pipeline_steps(dataset: Dict, name: str) -> List[Dict]:
    def type_name(step):
        kind = step.get('type') if isinstance(step, dict) else None
        return kind if isinstance(kind, str) else getattr(kind, '__name__', None)
    return [step for step in dataset.get('pipeline') or [] if type_name(step) == name]


def apply_data_options(cfg: Config, options: Dict) -> None:
    """``--cfg-options`` of the data's top-level keys (``data_root``, ``classes``, ``palette``,
    ``reduce_zero_label``, ``ignore_index``) set every dataloader's dataset; ``classes`` and
    ``ignore_index`` also the heads (class count, ignored label), crop padding and metric."""
    given = {k: options[k] for k in DATA_OPTIONS if k in options}
    if 'classes' in given:
        classes = given['classes']
        given['classes'] = (classes,) if isinstance(classes, str) else tuple(classes)
        if not given['classes']:
            raise InvalidInputError('--cfg-options classes= names no class')
        cfg.classes = given['classes']
        cfg.num_classes = len(given['classes'])
    for _, dataset in _loader_datasets(cfg):
        for key in ('data_root', 'reduce_zero_label', 'ignore_index'):
            if key in given:
                dataset[key] = given[key]
        for key in ('classes', 'palette'):
            if key in given:
                dataset['metainfo'] = dict(dataset.get('metainfo') or {}, **{key: given[key]})
    for key, head in _heads(cfg):
        if 'classes' in given and f'{key}.num_classes' not in options:  # a head set explicitly is checked
            head['num_classes'] = len(given['classes'])
        if 'ignore_index' in given:
            head['ignore_index'] = given['ignore_index']
    if 'ignore_index' in given:
        cfg.model.setdefault('data_preprocessor', {})['seg_pad_val'] = given['ignore_index']
        for evaluator in (cfg.get('val_evaluator'), cfg.get('test_evaluator')):
            if isinstance(evaluator, dict):
                evaluator['ignore_index'] = given['ignore_index']


def dataset_classes(dataset: Dict) -> Tuple[Optional[Tuple[str, ...]], str]:
    """The classes a dataset config declares (``metainfo.classes``, else its type's ``METAINFO``) and
    where they come from, for messages; ``None`` when it declares none."""
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes is not None:
        return ((classes,) if isinstance(classes, str) else tuple(classes)), 'dataset.metainfo.classes'
    kind = dataset.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    classes = getattr(cls, 'METAINFO', {}).get('classes') if cls is not None else None
    name = kind if isinstance(kind, str) else getattr(kind, '__name__', str(kind))
    return (tuple(classes) if classes else None), f'{name} (its METAINFO)'


def fit_to_data(cfg: Config) -> Optional[Tuple[str, ...]]:
    """Check a run config against its data before anything is built, and return the dataset's classes.

    Every dataloader must declare the same classes, and each head's ``num_classes`` must be their number:
    a 150-class head trained or scored on 3-class data otherwise gives mIoU 0 and NaN rows, silently.
    A mismatch is one line naming both numbers and the keys to set. ``CheckSegMap`` is set to the dataset's
    class count and ignore index, ``RandomCrop`` to its ignore index and ``LoadAnnotations`` to its
    ``reduce_zero_label``: the label checks follow the data, whatever the pipeline says.
    """
    found = []  # (where, classes)
    for loader, dataset in _loader_datasets(cfg):
        classes, source = dataset_classes(dataset)
        where = f'{loader}.{source}' if source.startswith('dataset.') else f'{loader}: {source}'
        if classes is None:
            kind = dataset.get('type')
            if kind is None or (isinstance(kind, str) and DATASETS.get(kind) is None):
                continue  # no or an unknown dataset type: mmengine names it when it builds the dataset
            raise InvalidInputError(f'{loader}.dataset ({dataset["type"]}) names no classes: set '
                                    f'metainfo=dict(classes=(...)) or --cfg-options "classes=[a,b,c]" (see "Your own '
                                    f'data" in semantic_segmentation/README.md)')
        found.append((where, classes))
        metainfo = dataset.get('metainfo') or {}
        if 'palette' in metainfo and not metainfo['palette']:  # None / []: mmseg picks the colours
            dataset['metainfo'] = {k: v for k, v in metainfo.items() if k != 'palette'}
        elif metainfo.get('palette') and metainfo.get('classes') is not None \
                and len(metainfo['palette']) != len(classes):
            raise InvalidInputError(f'{loader}.dataset.metainfo.palette has {len(metainfo["palette"])} colours for '
                                    f'{len(classes)} classes: give one [R, G, B] per class, or none (palette=None)')
        for step in _pipeline_steps(dataset, 'CheckSegMap'):
            step['num_classes'], step['ignore_index'] = len(classes), dataset.get('ignore_index', 255)
        for step in _pipeline_steps(dataset, 'RandomCrop'):  # cat_max_ratio leaves the ignored label out
            step['ignore_index'] = dataset.get('ignore_index', 255)
        reduce = dataset.get('reduce_zero_label')
        for step in _pipeline_steps(dataset, 'LoadAnnotations'):
            if reduce is not None and step.get('reduce_zero_label') not in (None, reduce):
                step['reduce_zero_label'] = reduce
    if not found:
        return None
    where, classes = found[0]
    for other, theirs in found[1:]:
        if theirs != classes:
            raise InvalidInputError(f'{where} has {len(classes)} classes but {other} has {len(theirs)}'
                                    f'{"" if len(theirs) != len(classes) else " (other names)"}: every dataloader '
                                    'needs the same classes (--cfg-options "classes=[a,b,c]" sets them all)')
    wrong = [(key, head.get('num_classes')) for key, head in _heads(cfg) if head.get('num_classes') != len(classes)]
    if wrong:
        heads = ', '.join(f'{key}.num_classes is {n}' for key, n in wrong)
        fix = ' '.join(f'{key}.num_classes={len(classes)}' for key, _ in _heads(cfg))
        raise InvalidInputError(f'the data has {len(classes)} classes ({where}) but {heads}: set --cfg-options {fix} '
                                '(the configs of configs/semantic_segmentation/custom/ take it from the data)')
    return classes


def eval_dataset_record(dataset: Any) -> Dict:
    """``eval_metrics.json``'s ``dataset`` (:func:`mpvit.model_zoo.dataset_record`) for an mmseg dataset:
    ``ade20k`` for ADE20KDataset, else the dataset's class name (the data root's folder name for
    BaseSegDataset, which names nothing); the split is the image folder's name (ADE20K's ``validation``);
    the fingerprint is that of the sorted label file names."""
    from mpvit import model_zoo

    kind = type(dataset).__name__
    if kind == 'ADE20KDataset':
        name = 'ade20k'
    elif kind == 'BaseSegDataset':
        name = osp.basename(osp.normpath(dataset.data_root or '')) or 'custom'
    else:
        name = kind.removesuffix('Dataset') or kind
    img_dir = dataset.data_prefix.get('img_path') or dataset.data_root or ''
    ann_dir = dataset.data_prefix.get('seg_map_path') or ''
    infos = [dataset.get_data_info(i) for i in range(len(dataset))]
    labels = sorted(osp.relpath(info['seg_map_path'], ann_dir) if ann_dir else osp.basename(info['seg_map_path'])
                    for info in infos if info.get('seg_map_path'))
    return model_zoo.dataset_record(name, osp.basename(osp.normpath(img_dir)), len(dataset),
                                    fingerprint=model_zoo.fingerprint_names(labels),
                                    classes=list(dataset.metainfo.get('classes') or ()))
