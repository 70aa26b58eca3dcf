"""What the drivers write after an evaluation (``eval_metrics.json``) and what ``paper_tables.py`` needs to place
it: the paper row a run reproduces, and the dataset it was measured on.

Used by the four drivers (``classification/main.py``, ``detectron2/train_net.py``, ``deformable_detr/main.py``,
``semantic_segmentation/tools/test.py``) and the table tools (``tools/paper_tables.py``, ``reproduce_paper.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from mpvit import model_zoo
from mpvit.errors import MissingFileError
from mpvit.serialization import atomic_file
from mpvit.weights import file_sha256

__all__ = ['PAPER_DATASETS', 'dataset_record', 'fingerprint_names', 'on_paper_dataset', 'paper_row',
           'write_eval_metrics']


def _d2_bases(config: Path):
    """A Detectron2 YAML and the files it inherits from (``_BASE_``), nearest first; a missing one is an error."""
    while True:
        yield config
        with open(config) as f:
            base = (yaml.safe_load(f) or {}).get('_BASE_')
        if not base:
            return
        parent, config = config, (config.parent / base).resolve()
        if not config.is_file():
            raise MissingFileError(f'{parent}: _BASE_ {base} does not exist ({config})')


def paper_row(task: str, config: str | os.PathLike | None = None, model: str | None = None) -> Optional[str]:
    """The released checkpoint (row of the paper's tables) that a run of ``config`` / ``model`` reproduces.

    Classification rows are found by model name, Deformable DETR ones by backbone; a Detectron2 config by
    itself or the nearest config it inherits from that has a released checkpoint (a demo config derived
    from ``mask_rcnn_mpvit_tiny_1x`` reports on that row); the others by config file name.
    """
    candidates = [e for e in model_zoo.entries() if e.task == task]
    if task == 'classification':
        return next((e.name for e in candidates if e.name == model), None)
    if task == 'deformable_detr' and model:  # the backbone decides (the config may be overridden)
        return next((e.name for e in candidates if e.name == f'deformable_detr_{model}'), None)
    if not config:
        return None
    config = model_zoo.find_config(config)  # a missing file is an error (outside a checkout: the package's copy)
    paths = list(_d2_bases(config)) if task == 'detectron2' else [config]
    for path in paths:
        for entry in candidates:
            if model_zoo.same_config(entry.config, path):
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
    return hashlib.sha256('\n'.join(map(str, names)).encode()).hexdigest()


def dataset_record(name: str, split: str, images: int, annotations: str | os.PathLike | None = None,
                   fingerprint: str | None = None, classes: Optional[List[str]] = None) -> Dict:
    """What ``eval_metrics.json`` says about the evaluated data: ``name`` (lower case: ``imagenet-1k``,
    ``coco``, ``ade20k``, or the user's own), ``split``, the number of ``images`` evaluated, the annotation
    file and a fingerprint (sha256 of that file when there is one), and the number of classes."""
    if fingerprint is None and annotations and os.path.isfile(annotations):
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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Frameworks report numpy / torch scalars (mmseg: numpy.float32); .item() makes them plain numbers.
    text = json.dumps(record, indent=2, default=lambda v: v.item() if hasattr(v, 'item') else str(v))
    with atomic_file(path) as f:
        f.write(text.encode())
    return record
