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
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Dict, List, Optional

RELEASED = 'released'
TASKS = ('classification', 'detectron2', 'mmseg', 'deformable_detr')


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint: what it is, the config of ours that builds its model, and the reported figures."""

    name: str
    task: str
    config: str  # relative to the repository root
    url: str
    metrics_url: Optional[str] = None
    reported: Dict[str, float] = field(default_factory=dict)


def _same_config(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Same file name in a folder of the same name (``detectron2/x.yaml``): configs of different tasks share
    file names (``classification/mpvit_small.yaml``, ``deformable_detr/mpvit_small.yaml``)."""
    return Path(a).parts[-2:] == Path(os.path.abspath(b)).parts[-2:]


@cache
def entries() -> List[ZooEntry]:
    with open(Path(__file__).with_name('model_zoo.json')) as f:
        return [ZooEntry(**e) for e in json.load(f)['checkpoints']]


def get(name: str) -> ZooEntry:
    """The entry called ``name`` (e.g. ``mask_rcnn_mpvit_small_ms_3x``, ``mpvit_small``)."""
    for entry in entries():
        if entry.name == name:
            return entry
    raise KeyError(f'{name!r} is not a released checkpoint; known: {", ".join(e.name for e in entries())}')


def for_config(config: str | os.PathLike) -> ZooEntry:
    """The released checkpoint whose model ``config`` builds (matched by the config's file name)."""
    for entry in entries():
        if _same_config(entry.config, config):
            return entry
    raise ValueError(f'{config}: the authors released no checkpoint for this config (mpvit/model_zoo.json lists '
                     f'the {len(entries())} that have one); pass a file or URL instead of {RELEASED!r}')


def resolve(weights: str, config: str | os.PathLike | None = None, model: str | None = None) -> str:
    """``weights`` itself, or for ``released`` the URL of the checkpoint of ``config`` (else of timm ``model``)."""
    if weights != RELEASED:
        return weights
    if config:
        return for_config(config).url
    if model:
        return get(model).url
    raise ValueError(f'weights {RELEASED!r} need a config file (or model name) to look the checkpoint up')


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


def write_eval_metrics(path: str | os.PathLike, task: str, metrics: Dict, config: str | os.PathLike | None = None,
                       model: str | None = None) -> Dict:
    """Write an evaluation's metrics with what ``tools/paper_tables.py --results`` needs to place them."""
    record = dict(metrics, task=task, paper_row=paper_row(task, config, model),
                  config=str(config) if config else None, model=model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + '.tmp')
    # Frameworks report numpy / torch scalars (mmseg: numpy.float32); .item() makes them plain numbers.
    tmp.write_text(json.dumps(record, indent=2, default=lambda v: v.item() if hasattr(v, 'item') else str(v)))
    os.replace(tmp, path)
    return record
