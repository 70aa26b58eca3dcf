"""The authors' released checkpoints, looked up by our config files (``model_zoo.json`` holds the data).

Every driver accepts the word ``released`` where it takes weights, the way
Detectron2's ``model_zoo.get_checkpoint_url(config)`` works::

    python detectron2/train_net.py --config-file configs/detectron2/mask_rcnn_mpvit_small_ms_3x.yaml \\
        --eval-only MODEL.WEIGHTS released
    python semantic_segmentation/tools/test.py configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py released
    python deformable_detr/main.py -c configs/deformable_detr/mpvit_small.yaml --eval --resume released
    python classification/main.py -c configs/classification/mpvit_small.yaml --eval --resume released
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Dict, List, Optional

from mpvit.errors import InvalidInputError, UnknownNameError

RELEASED = 'released'
TASKS = ('classification', 'detectron2', 'mmseg', 'deformable_detr')
CITATION = """@inproceedings{lee2022mpvit,
  title={MPViT: Multi-Path Vision Transformer for Dense Prediction},
  author={Youngwan Lee and Jonghee Kim and Jeff Willette and Sung Ju Hwang},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2022}
}"""
HUB_TASKS = {'classification': 'image-classification', 'detectron2': 'object-detection',
             'deformable_detr': 'object-detection', 'mmseg': 'image-segmentation'}
_DATASETS = {'classification': 'ImageNet-1k', 'detectron2': 'COCO', 'deformable_detr': 'COCO', 'mmseg': 'ADE20K'}
_FIGURES = {'acc1': 'ImageNet-1k top-1 (%)', 'box_ap': 'COCO val2017 box AP', 'mask_ap': 'COCO val2017 mask AP',
            'miou': 'ADE20K val mIoU (%)', 'params_m': '#params (M)', 'gflops': 'GFLOPs', 'epochs': 'epochs',
            'iters': 'iterations', 'crop': 'crop'}


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint: what it is, the config of ours that builds its model, and the reported figures."""

    name: str
    task: str
    config: str  # relative to the repository root
    url: str
    metrics_url: Optional[str] = None
    reported: Dict[str, float] = field(default_factory=dict)
    mirrors: List[str] = field(default_factory=list)  # more URLs of the same file
    hf_hub_id: Optional[str] = None  # a Hub repository holding it (tools/export_hub.py's layout)
    sha256: Optional[str] = None  # of the released file, where known: downloads and local copies are checked

    @property
    def sources(self) -> List[str]:
        """The URLs of this file, the authors' first."""
        return [self.url, *self.mirrors]

    @property
    def hub_filename(self) -> str:
        """The file in its Hub repository: timm's ``model.safetensors`` for an ImageNet classifier, the whole
        task checkpoint (``<name>.safetensors``, the released key layout) for the dense tasks."""
        return 'model.safetensors' if self.task == 'classification' else f'{self.name}.safetensors'


def _same_config(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same file name in a folder of the same name (``detectron2/x.yaml``): configs of different tasks share
    file names (``classification/mpvit_small.yaml``, ``deformable_detr/mpvit_small.yaml``)."""
    return Path(a).parts[-2:] == Path(os.path.abspath(b)).parts[-2:]


@cache
def _data() -> Dict:
    with open(Path(__file__).with_name('model_zoo.json')) as f:
        return json.load(f)


def entries() -> List[ZooEntry]:
    return [ZooEntry(**e) for e in _data()['checkpoints']]


def weights_license() -> Dict[str, str]:
    """The released weights' license: Hub ``id`` / ``name`` / ``link`` and a one-line ``summary``."""
    return dict(_data()['license'])


def model_card(name: str, hub_id: Optional[str] = None, source_sha256: Optional[str] = None) -> Dict:
    """A Hub model card for a released checkpoint, in the ``model_card`` form of timm's ``push_to_hf_hub``:
    the weights' license, the figures the authors report, where the file came from, usage and citation."""
    entry = get(name)
    license_ = weights_license()
    variant = re.search(r'mpvit_(tiny|xsmall|small|base)', entry.name).group(0)
    dense = entry.task != 'classification'
    repo = hub_id or '<org>/<name>'
    details = {'Model type': f'{HUB_TASKS[entry.task]} ({entry.task})' if dense else 'image classification',
               'Dataset': _DATASETS[entry.task],
               'Reported by the authors': {_FIGURES.get(k, k): v for k, v in entry.reported.items()},
               'Papers': {'MPViT: Multi-Path Vision Transformer for Dense Prediction': 'https://arxiv.org/abs/2112.11010'},
               'Original': entry.url, 'Config (this repository)': entry.config,
               'License': f"{license_['summary']} ({license_['link']})"}
    if source_sha256:
        details['Converted from (sha256)'] = source_sha256
    usage = ("```python\nimport timm\nimport mpvit  # registers the MPViT models with timm\n\n"
             f"model = timm.create_model('hf-hub:{repo}', pretrained=True)\n```\n")
    if dense:
        usage += (f'\n`model.safetensors` is the {variant} backbone as a timm model (`num_classes=0`; '
                  f'`features_only=True` gives the stage maps). `{entry.hub_filename}` is the whole {entry.task} '
                  f'model in the released key layout, which `released` in this repository evaluates with '
                  f'`{entry.config}` once `model_zoo.json` names this repository.\n')
    return {'license': license_['id'], 'license_name': license_['name'], 'license_link': license_['link'],
            'tags': [HUB_TASKS[entry.task], 'timm', 'mpvit'],
            'description': f'MPViT ({variant}) weights released by the authors of the paper, as safetensors.',
            'details': details, 'usage': usage, 'citation': CITATION}


def by_url(url: str) -> Optional[ZooEntry]:
    """The released checkpoint served at ``url`` (its URL or a mirror), if any."""
    for entry in entries():
        if url in entry.sources:
            return entry
    return None


def get(name: str) -> ZooEntry:
    """The entry called ``name`` (e.g. ``mask_rcnn_mpvit_small_ms_3x``, ``mpvit_small``)."""
    for entry in entries():
        if entry.name == name:
            return entry
    raise UnknownNameError(f'{name!r} is not a released checkpoint; known: {", ".join(e.name for e in entries())}')


def for_config(config: str | os.PathLike) -> ZooEntry:
    """The released checkpoint whose model ``config`` builds (matched by the config's file name)."""
    for entry in entries():
        if _same_config(entry.config, config):
            return entry
    raise InvalidInputError(f'{config}: the authors released no checkpoint for this config (mpvit/model_zoo.json lists '
                            f'the {len(entries())} that have one); pass a file or URL instead of {RELEASED!r}')


def resolve(weights: str, config: str | os.PathLike | None = None, model: str | None = None) -> str:
    """``weights`` itself, or for ``released`` the URL of the checkpoint of ``config`` (else of timm ``model``)."""
    if weights != RELEASED:
        return weights
    if config:
        return for_config(config).url
    if model:
        return get(model).url
    raise InvalidInputError(f'weights {RELEASED!r} need a config file (or model name) to look the checkpoint up')


def _d2_bases(config: Path):
    """A Detectron2 YAML and the files it inherits from (``_BASE_``), nearest first."""
    import yaml

    while config.is_file():
        yield config
        with open(config) as f:
            base = (yaml.safe_load(f) or {}).get('_BASE_')
        if not base:
            return
        config = (config.parent / base).resolve()


def paper_row(task: str, config: str | os.PathLike | None = None, model: str | None = None) -> Optional[str]:
    """The released checkpoint (row of the paper's tables) that a run of ``config`` / ``model`` reproduces.

    Classification rows are found by model name, Deformable DETR ones by backbone; a Detectron2 config by
    itself or the nearest config it inherits from that has a released checkpoint (a demo config derived
    from ``mask_rcnn_mpvit_tiny_1x`` reports on that row); the others by config file name.
    """
    candidates = [e for e in entries() if e.task == task]
    if task == 'classification':
        return next((e.name for e in candidates if e.name == model), None)
    if task == 'deformable_detr' and model:  # the backbone decides (the config may be overridden)
        return next((e.name for e in candidates if e.name == f'deformable_detr_{model}'), None)
    if not config:
        return None
    paths = list(_d2_bases(Path(config))) if task == 'detectron2' else [Path(config)]
    for path in paths:
        for entry in candidates:
            if _same_config(entry.config, path):
                return entry.name
    return None


# The dataset each table of the paper was measured on: (name, split, number of images). A result goes on a
# paper row only when its ``dataset`` record says it was measured on exactly this (names as the drivers write
# them: ``dataset_record``).
PAPER_DATASETS = {
    'classification': ('imagenet-1k', 'val', 50000),
    'detectron2': ('coco', 'val2017', 5000),
    'deformable_detr': ('coco', 'val2017', 5000),
    'mmseg': ('ade20k', 'validation', 2000),
}


def fingerprint_names(names) -> str:
    """sha256 of a list of names (the files and labels of a folder dataset without an annotation file)."""
    import hashlib

    return hashlib.sha256('\n'.join(map(str, names)).encode()).hexdigest()


def dataset_record(name: str, split: str, images: int, annotations: str | os.PathLike | None = None,
                   fingerprint: str | None = None, classes: Optional[List[str]] = None) -> Dict:
    """What ``eval_metrics.json`` says about the evaluated data: ``name`` (lower case: ``imagenet-1k``,
    ``coco``, ``ade20k``, or the user's own), ``split``, the number of ``images`` evaluated, the annotation
    file and a fingerprint (sha256 of that file when there is one), and the number of classes."""
    if fingerprint is None and annotations and os.path.isfile(annotations):
        from mpvit.weights import file_sha256  # (mpvit.weights imports this module)

        fingerprint = file_sha256(annotations)
    record = dict(name=str(name).lower(), split=str(split), images=int(images),
                  annotations=str(annotations) if annotations else None, sha256=fingerprint)
    if classes is not None:
        record['num_classes'] = len(classes)
    return record


def on_paper_dataset(task: str, dataset: Optional[Dict]) -> bool:
    """Whether a ``dataset_record`` is the dataset and split of ``task``'s paper table (all its images)."""
    if not dataset or task not in PAPER_DATASETS:
        return False
    name, split, images = PAPER_DATASETS[task]
    return (dataset.get('name'), dataset.get('split'), dataset.get('images')) == (name, split, images)


def write_eval_metrics(path: str | os.PathLike, task: str, metrics: Dict, config: str | os.PathLike | None = None,
                       model: str | None = None, dataset: Optional[Dict] = None) -> Dict:
    """Write an evaluation's metrics with what ``tools/paper_tables.py --results`` needs to place them:
    the paper row the config reproduces, and the ``dataset`` evaluated (``dataset_record``)."""
    record = dict(metrics, task=task, paper_row=paper_row(task, config, model),
                  config=str(config) if config else None, model=model, dataset=dataset)
    from mpvit.serialization import atomic_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Frameworks report numpy / torch scalars (mmseg: numpy.float32); .item() makes them plain numbers.
    text = json.dumps(record, indent=2, default=lambda v: v.item() if hasattr(v, 'item') else str(v))
    with atomic_file(path) as f:
        f.write(text.encode())
    return record
