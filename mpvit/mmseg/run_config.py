"""The mmseg drivers' config handling (``semantic_segmentation/tools/train.py``, ``test.py`` and ``demo.py``): a
config read as the tools read it, the data's top-level options applied to every dataloader, the config
checked against its data before anything is built, and the evaluated dataset's record.

Nothing here is registered with mmengine (``mpvit.mmseg`` does not import it); only the drivers use it.
"""
from __future__ import annotations

import inspect
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config
from mmseg.registry import DATASETS

from mpvit import eval_results
from mpvit.errors import InvalidInputError, MissingFileError

__all__ = ['DATA_OPTIONS', 'apply_data_options', 'check_loader_data', 'dataset_classes', 'eval_dataset_record',
           'fit_to_data', 'load_run_config']


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


def _dataset_defaults(dataset: Dict) -> Dict[str, Any]:
    """The keyword defaults of the dataset's class (ADE20KDataset: ``reduce_zero_label=True``), then its config."""
    kind = dataset.get('type')
    cls = DATASETS.get(kind) if isinstance(kind, str) else kind
    defaults: Dict[str, Any] = {}
    for klass in reversed(getattr(cls, '__mro__', ())):
        init = klass.__dict__.get('__init__')
        if init is not None:
            defaults.update({name: p.default for name, p in inspect.signature(init).parameters.items()
                             if p.default is not inspect.Parameter.empty})
    return {**defaults, **dataset}


def check_loader_data(cfg: Config, loaders: Sequence[str]) -> None:
    """``python -m mpvit.check_data segmentation``'s checks of the ``loaders``' data (masks of their images'
    size, index maps, labels among the classes and the ignore index), before the Runner builds anything: the
    first kind of problem in one line. A folder two dataloaders share is checked once."""
    from mpvit.check_data import check_segmentation

    seen = set()
    for loader, dataset in _loader_datasets(cfg):
        classes, _ = dataset_classes(dataset)
        if loader not in loaders or classes is None:
            continue
        data = _dataset_defaults(dataset)
        prefix = data.get('data_prefix') or {}
        if not isinstance(prefix, dict) or 'img_path' not in prefix or 'seg_map_path' not in prefix:
            continue  # a dataset of another layout: mmseg reads (and names) it
        root = data.get('data_root') or ''
        image_dir, mask_dir = osp.join(root, prefix['img_path']), osp.join(root, prefix['seg_map_path'])
        key = (image_dir, mask_dir, len(classes), data.get('reduce_zero_label'), data.get('ignore_index'))
        if key in seen:
            continue
        seen.add(key)
        check_segmentation(image_dir, mask_dir, len(classes), ignore_index=data.get('ignore_index', 255),
                           reduce_zero_label=bool(data.get('reduce_zero_label')),
                           image_suffix=data.get('img_suffix', '.jpg'),
                           mask_suffix=data.get('seg_map_suffix', '.png')).raise_errors()


def eval_dataset_record(dataset: Any) -> Dict:
    """``eval_metrics.json``'s ``dataset`` (``mpvit/eval_results.py``'s ``dataset_record``) for an mmseg dataset:
    ``ade20k`` for ADE20KDataset, else the dataset's class name (the data root's folder name for
    BaseSegDataset, which names nothing); the split is the image folder's name (ADE20K's ``validation``);
    the fingerprint is that of the sorted label file names."""
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
    return eval_results.dataset_record(name, osp.basename(osp.normpath(img_dir)), len(dataset),
                                       fingerprint=eval_results.fingerprint_names(labels),
                                       classes=list(dataset.metainfo.get('classes') or ()))
