"""The authors' released checkpoints, looked up by our config files (``model_zoo.json`` holds the data).

Every driver accepts the word ``released`` where it takes weights, the way
Detectron2's ``model_zoo.get_checkpoint_url(config)`` works::

    python detectron2/train_net.py --config-file configs/detectron2/mask_rcnn_mpvit_small_ms_3x.yaml \\
        --eval-only MODEL.WEIGHTS released
    python semantic_segmentation/tools/test.py configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py released
    python deformable_detr/main.py -c configs/deformable_detr/mpvit_small.yaml --eval --resume released
    python classification/main.py -c configs/classification/mpvit_small.yaml --eval --resume released

A config (or any command line) names one checkpoint by ``zoo:<name>`` (``zoo:mpvit_small``: the authors'
ImageNet MPViT-S), so that its URLs live in ``model_zoo.json`` only. :func:`mpvit.weights.fetch`, which every
loader goes through, turns the word into the entry's sources.

The configs the entries name ship with the package (the wheel holds ``configs/`` as ``mpvit/configs/``):
:func:`config_path` finds one in a checkout or in the installed package.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Dict, List, Optional

from mpvit.errors import InvalidInputError, MissingFileError, UnknownNameError

RELEASED = 'released'
ZOO_PREFIX = 'zoo:'  # zoo:<name>: an entry of model_zoo.json, by name
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
    def zoo_name(self) -> str:
        """The word configs use for this checkpoint (``zoo:mpvit_small``)."""
        return ZOO_PREFIX + self.name

    @property
    def config_file(self) -> Path:
        """The config file of ``config``, in this checkout or in the installed package."""
        return config_path(self.config)

    @property
    def hub_filename(self) -> str:
        """The file in its Hub repository: timm's ``model.safetensors`` for an ImageNet classifier, the whole
        task checkpoint (``<name>.safetensors``, the released key layout) for the dense tasks."""
        return 'model.safetensors' if self.task == 'classification' else f'{self.name}.safetensors'


# configs/ of a checkout (the repository root holds setup.py), and the copy of it that the wheel installs.
_CHECKOUT = Path(__file__).resolve().parents[1]
_PACKAGED_CONFIGS = Path(__file__).resolve().with_name('configs')


def config_path(relative: str | os.PathLike) -> Path:
    """The file of a config named relative to the repository root (``configs/detectron2/x.yaml``, as
    ``model_zoo.json`` and the docs name them): in this checkout, else in the installed package's copy.

    An installed wheel has no checkout around it; a missing config is an error, never a silent miss.
    """
    parts = Path(relative).parts
    if not parts or parts[0] != 'configs' or '..' in parts:
        raise InvalidInputError(f'{relative}: not a config of this repository (expected configs/<task>/<file>)')
    places = ([_CHECKOUT.joinpath(*parts)] if (_CHECKOUT / 'setup.py').is_file() else []) + \
        [_PACKAGED_CONFIGS.joinpath(*parts[1:])]
    for place in places:
        if place.is_file():
            return place
    raise MissingFileError(f'{relative}: no such config (looked in {" and ".join(map(str, places))}); '
                           'reinstall mpvit, whose wheel ships configs/ as mpvit/configs/')


def find_config(config: str | os.PathLike) -> Path:
    """A config given as a path (as is, else relative to the repository root: :func:`config_path`)."""
    path = Path(config).expanduser()
    if path.is_file():
        return path
    if Path(config).parts[:1] == ('configs',):
        return config_path(config)
    raise MissingFileError(f'{config}: no such config file')


def same_config(a: str | os.PathLike, b: str | os.PathLike) -> bool:
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
    usage = (
        '`import mpvit` (`pip install` this repository) registers the MPViT models with timm: without it, timm '
        "says `Unknown model`, and transformers that the architecture needs a newer timm.\n\n"
        "```python\nimport timm\nimport torch\nimport mpvit  # registers the MPViT models with timm\n\n"
        f"model = timm.create_model('hf-hub:{repo}', pretrained=True).eval()\n")
    if dense:
        usage += "features = model.forward_features(torch.randn(1, 3, 224, 224))  # the stride-32 map\n"
    else:
        usage += ("config = timm.data.resolve_data_config({}, model=model)\n"
                  "transform = timm.data.create_transform(**config)  # bicubic resize, centre crop, normalise\n"
                  "logits = model(transform(image).unsqueeze(0))  # image: a PIL image\n")
    usage += (
        '\n# feature extraction (dense prediction, depth): the stage maps at strides 4, 8, 16, 32, and with\n'
        "# 'stem.0' / 'stem.1' in out_indices also the stem's stride-2 / stride-4 maps\n"
        f"backbone = timm.create_model('hf-hub:{repo}', pretrained=True, features_only=True,\n"
        "                             out_indices=('stem.0', 0, 1, 2, 3)).eval()\n"
        'maps = backbone(torch.randn(1, 3, 224, 224))\n'
        'print(backbone.feature_info.channels(), backbone.feature_info.reduction())\n```\n\n'
        'With transformers (`import mpvit` first here too):\n\n```python\n'
        f"import mpvit\nfrom transformers import AutoModel, {'' if dense else 'AutoModelForImageClassification, '}"
        'TimmBackbone\n\n')
    if not dense:
        usage += f"classifier = AutoModelForImageClassification.from_pretrained('{repo}')\n"
    usage += (f"pooled = AutoModel.from_pretrained('{repo}')  # TimmWrapperModel: pooled features\n"
              f"backbone = TimmBackbone.from_pretrained('hf-hub:{repo}', out_indices=(0, 1, 2, 3))  # stage maps\n"
              '```\n')
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


def is_zoo_name(source: object) -> bool:
    """Whether ``source`` is a ``zoo:<name>`` word (a string; a file whose name starts so is ``./zoo:<file>``)."""
    return isinstance(source, str) and source.startswith(ZOO_PREFIX)


def zoo_entry(word: str) -> ZooEntry:
    """The entry a ``zoo:<name>`` word names; an unknown word is one line naming the known ones."""
    name = word[len(ZOO_PREFIX):] if is_zoo_name(word) else word
    for entry in entries():
        if entry.name == name:
            return entry
    raise UnknownNameError(f'{word!r}: no checkpoint of that name in mpvit/model_zoo.json; known: '
                           f'{", ".join(e.zoo_name for e in entries())}')


def for_config(config: str | os.PathLike) -> ZooEntry:
    """The released checkpoint whose model ``config`` builds (matched by the config's file name)."""
    for entry in entries():
        if same_config(entry.config, config):
            return entry
    raise InvalidInputError(f'{config}: the authors released no checkpoint for this config (mpvit/model_zoo.json lists '
                            f'the {len(entries())} that have one); pass a file or URL instead of {RELEASED!r}')


def resolve(weights: str, config: str | os.PathLike | None = None, model: str | None = None) -> str:
    """``weights`` itself, or for ``released`` the URL of the checkpoint of ``config`` (else of timm ``model``).

    A ``zoo:<name>`` word stays as it is (:func:`mpvit.weights.fetch` reads it), but an unknown one fails here,
    before any work."""
    if is_zoo_name(weights):
        zoo_entry(weights)
        return weights
    if weights != RELEASED:
        return weights
    if config:
        return for_config(config).url
    if model:
        return get(model).url
    raise InvalidInputError(f'weights {RELEASED!r} need a config file (or model name) to look the checkpoint up')


def listing() -> str:
    """One line per released checkpoint: its ``zoo:`` word, task, config and reported figures, then its URLs
    (the docs point here rather than copy the URLs)."""
    lines = []
    for entry in entries():
        figures = ', '.join(f'{k} {v}' for k, v in entry.reported.items())
        lines.append(f'{entry.zoo_name:34} {entry.task:16} {entry.config}  ({figures})')
        lines.extend(f'    {url}' for url in entry.sources)
        if entry.hf_hub_id:
            lines.append(f'    hf-hub:{entry.hf_hub_id}/{entry.hub_filename}')
    return '\n'.join(lines)
