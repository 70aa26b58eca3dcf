"""Rebuild the four tables of the authors' README (= the paper's) from this repository's configs.

    python tools/paper_tables.py                      # params + FLOPs of every row, live
    python tools/paper_tables.py --results output/    # + the metrics our evaluation commands wrote
    python tools/paper_tables.py --no-flops --json tables.json

Each row is one released checkpoint (``mpvit/model_zoo.json``). Its model is built from our config for that
row; #params are its trainable parameters (shared ones once) next to the README's rounded figure. FLOPs follow
each table's convention, which the output states. With ``--results DIR`` every ``eval_metrics.json`` under
DIR (written by classification/main.py, detectron2/train_net.py, semantic_segmentation/tools/test.py and
deformable_detr/main.py) that was measured on the row's own dataset and split (ImageNet-1k val, COCO val2017,
ADE20K val: name, split and image count, as the file records them) is placed on the row it evaluates, with
the difference to the README's figure; when several are, the newest is shown and the row is flagged. Every
other result (your own data, the demo's, a subset, files without a dataset record) is listed apart.
FLOP counts are cached in ``.cache/paper_tables`` (keyed by the model's structure and the package code).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (known dependency warnings off in this command)

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from mpvit import eval_results, model_zoo, set_fast_ops
from mpvit.errors import InvalidInputError
from mpvit.model_zoo import ZooEntry
from mpvit.training import count_parameters

REPO = Path(__file__).resolve().parents[1]  # the checkout: its configs and drivers

CACHE = REPO / '.cache' / 'paper_tables' / 'flops.json'
DETECTION_SIZE = (800, 1280)  # (height, width) of the image the detectors' FLOPs are counted at
SEGMENTATION_SIZE = (512, 2048)
# The metric columns of each table: (key in the row, README key, how to read it from eval_metrics.json).
METRICS: Dict[str, List] = {
    'classification': [('acc1', 'acc1', lambda m: m.get('acc1'))],
    'detectron2': [('box_ap', 'box_ap', lambda m: (m.get('bbox') or {}).get('AP')),
                   ('mask_ap', 'mask_ap', lambda m: (m.get('segm') or {}).get('AP'))],
    'deformable_detr': [('box_ap', 'box_ap', lambda m: m.get('AP'))],
    'mmseg': [('miou', 'miou', lambda m: m.get('mIoU'))],
}
TITLES = {
    'classification': 'ImageNet-1K classification',
    'detectron2': 'COCO detection and instance segmentation (Detectron2: RetinaNet, Mask R-CNN)',
    'deformable_detr': 'COCO detection (Deformable DETR, 50 epochs)',
    'mmseg': 'ADE20K semantic segmentation (UperNet, 512x512 crops, 160k iterations)',
}
FLOP_CONVENTIONS = {
    'classification': 'fvcore at 1x3x224x224, eval mode (one multiply-add = one FLOP).',
    'detectron2': ("Detectron2's flop counting (fvcore, one multiply-add = one FLOP) of the whole detector in "
                   "inference at 800x1280 (random weights, fixed random image: ROI-head FLOPs depend on the "
                   "detections), and of backbone + FPN alone; the paper does not state its protocol."),
    'deformable_detr': 'not in the README table; not counted.',
    'mmseg': "mmengine's complexity counter, backbone + UperNet decode head at 1x3x512x2048.",
}


# ------------------------------------------------------------------------------------------- models

def build_model(entry: ZooEntry) -> torch.nn.Module:
    """The model of ``entry``'s config, randomly initialised, on the CPU, eval mode."""
    torch.manual_seed(0)
    config = str(REPO / entry.config)
    if entry.task == 'classification':
        import timm
        return timm.create_model(entry.name).eval()
    if entry.task == 'detectron2':
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model as build_d2

        from mpvit.d2 import add_mpvit_config
        cfg = get_cfg()
        add_mpvit_config(cfg)
        cfg.merge_from_file(config)
        cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', 'MODEL.MPVIT.NORM', 'BN'])
        return build_d2(cfg).eval()
    if entry.task == 'mmseg':
        from mmengine.config import Config
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules

        import mpvit.mmseg  # noqa: F401
        register_all_modules()
        cfg = Config.fromfile(config)
        cfg.model.backbone.pop('init_cfg', None)
        bn = dict(type='BN', requires_grad=True)  # SyncBN's count, no process group
        cfg.model.backbone.norm_layer = bn
        for part in ('decode_head', 'auxiliary_head'):
            cfg.model[part].norm_cfg = bn
        return MODELS.build(cfg.model).eval()
    if entry.task == 'deformable_detr':
        import yaml

        from mpvit.deformable_detr import build_deformable_detr
        with open(config) as f:
            c = yaml.safe_load(f)
        return build_deformable_detr(c['backbone'], c['num_classes'], c['num_queries'],
                                     c['num_feature_levels']).eval()
    raise ValueError(f'{entry.name}: unknown task {entry.task!r}')


def _quiet(analysis):
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


@torch.no_grad()
def count_flops(entry: ZooEntry, model: torch.nn.Module) -> Optional[Dict[str, float]]:
    """GFLOPs in the convention of ``entry``'s table (None where the table has no FLOPs)."""
    set_fast_ops(model, False)  # the published formulation: the fast one adds multiply-by-zero work
    if entry.task == 'classification':
        from fvcore.nn import FlopCountAnalysis
        return {'gflops': _quiet(FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))).total() / 1e9}
    if entry.task == 'detectron2':
        from detectron2.utils.analysis import FlopCountAnalysis as D2FlopCountAnalysis
        from fvcore.nn import FlopCountAnalysis
        image = torch.rand(3, *DETECTION_SIZE, generator=torch.Generator().manual_seed(0)) * 255
        total = _quiet(D2FlopCountAnalysis(model, [{'image': image}])).total()
        normalised = ((image - model.pixel_mean) / model.pixel_std)[None]
        backbone = _quiet(FlopCountAnalysis(model.backbone, normalised)).total()
        return {'gflops': total / 1e9, 'backbone_fpn_gflops': backbone / 1e9}
    if entry.task == 'mmseg':
        from mmengine.analysis import FlopAnalyzer

        class DecodeOnly(torch.nn.Module):  # mmseg's get_flops: backbone + decode head, no auxiliary head
            def __init__(self, segmentor):
                super().__init__()
                self.segmentor = segmentor

            def forward(self, x):
                return self.segmentor._forward(x)

        # What mmseg's get_flops counts, without a warning for each auxiliary-head module the forward skips.
        analysis = FlopAnalyzer(DecodeOnly(model), inputs=(torch.zeros(1, 3, *SEGMENTATION_SIZE),))
        return {'gflops': _quiet(analysis).total() / 1e9}
    return None


def _fingerprint(entry: ZooEntry, model: torch.nn.Module) -> str:
    """What a FLOP count depends on: the model's structure (the same for a 1x and an MS 3x detector, so
    they share one count), its table's convention, and the code that builds it."""
    digest = hashlib.sha256(f'{entry.task}\n{model}'.encode())
    digest.update(Path(__file__).read_bytes())  # the counting conventions (and the textbook-ops switch)
    for path in sorted((REPO / 'mpvit').rglob('*.py')):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def cached_flops(entry: ZooEntry, model: torch.nn.Module, cache: Optional[Path]) -> Optional[Dict[str, float]]:
    store = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    key = _fingerprint(entry, model)
    if key not in store:
        store[key] = count_flops(entry, model)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix('.tmp')
            tmp.write_text(json.dumps(store, indent=1))
            os.replace(tmp, cache)
    return store[key]


# ------------------------------------------------------------------------------------------ results

@dataclass
class Results:
    """The ``eval_metrics.json`` files under a folder, sorted into what may stand on a paper row and the rest."""

    rows: Dict[str, Dict] = field(default_factory=dict)  # row -> the newest file measured on the row's dataset
    candidates: Dict[str, List[str]] = field(default_factory=dict)  # row -> every such file, oldest first
    other: List[Dict] = field(default_factory=list)  # measured elsewhere, or without a row or dataset record


def read_results(root: Path) -> Results:
    """``eval_metrics.json`` files under ``root``: on a row only if measured on that row's dataset and split."""
    results = Results()
    for path in sorted(root.rglob('eval_metrics.json'), key=lambda p: (p.stat().st_mtime, str(p))):
        try:
            record = dict(json.loads(path.read_text()), source=str(path))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise InvalidInputError(f'{path}: not a readable metrics file ({e})') from None
        row = record.get('paper_row')
        if row and eval_results.on_paper_dataset(record.get('task'), record.get('dataset')):
            results.rows[row] = record
            results.candidates.setdefault(row, []).append(str(path))
        else:
            results.other.append(record)
    return results


# ------------------------------------------------------------------------------------------- tables

def build_rows(flops: bool = True, results: Optional[Dict[str, Dict]] = None, cache: Optional[Path] = CACHE,
               progress: Callable[[str], None] = lambda _: None, names: Optional[List[str]] = None,
               candidates: Optional[Dict[str, List[str]]] = None) -> List[Dict]:
    """One row per released checkpoint (those in ``names`` only, when given); ``results``: row -> the
    evaluation placed on it (``Results.rows``), ``candidates``: row -> all files that could be."""
    rows = []
    for entry in model_zoo.entries():
        if names is not None and entry.name not in names:
            continue
        progress(entry.name)
        model = build_model(entry)
        row = dict(name=entry.name, task=entry.task, config=entry.config, url=entry.url,
                   reported=dict(entry.reported), params=count_parameters(model))
        if flops:
            row.update(cached_flops(entry, model, cache) or {})
        measured = (results or {}).get(entry.name)
        if measured:
            row['results_file'] = measured['source']
            row['results_candidates'] = (candidates or {}).get(entry.name, [measured['source']])
            for key, reported_key, read in METRICS[entry.task]:
                value = read(measured)
                if value is not None:
                    row[key] = float(value)
                    if reported_key in entry.reported:
                        row[f'{key}_diff'] = float(value) - entry.reported[reported_key]
        rows.append(row)
        del model
    return rows


def _num(value, fmt='.1f') -> str:
    return '-' if value is None else format(value, fmt)


def _metric_cells(row: Dict, key: str, with_results: bool) -> List[str]:
    cells = [_num(row['reported'].get(key))]
    if with_results:
        if key in row:
            flag = ' (!)' if len(row.get('results_candidates', [])) > 1 else ''
            cells += [_num(row[key], '.2f') + flag, _num(row.get(f'{key}_diff'), '+.2f')]
        else:
            cells += ['no results', '']
    return cells


def render(rows: List[Dict], with_results: bool = False, flops: bool = True) -> str:
    out = []
    for task, title in TITLES.items():
        task_rows = [r for r in rows if r['task'] == task]
        metrics = [k for k, _, _ in METRICS[task]]
        head = ['Row']
        for key in metrics:
            head += [f'{key} (paper)'] + ([f'{key} (ours)', 'diff'] if with_results else [])
        head += ['#params (ours)', '#params (paper)']
        has_flops = flops and task != 'deformable_detr'
        if has_flops:
            head += ['GFLOPs (ours)'] + (['GFLOPs backbone+FPN (ours)'] if task == 'detectron2' else []) + [
                'GFLOPs (paper)']
        out += [f'### {title}', '', '| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
        for r in task_rows:
            cells = [r['name']]
            for key in metrics:
                cells += _metric_cells(r, key, with_results)
            cells += [f"{r['params']:,}", _num(r['reported'].get('params_m'), 'g') + 'M'
                      if 'params_m' in r['reported'] else '-']
            if has_flops:
                cells += [_num(r.get('gflops'))]
                if task == 'detectron2':
                    cells += [_num(r.get('backbone_fpn_gflops'))]
                cells += [_num(r['reported'].get('gflops'), 'g')]
            out.append('| ' + ' | '.join(cells) + ' |')
        out.append('')
        if has_flops:
            out.append(f'FLOPs: {FLOP_CONVENTIONS[task]}')
        sources = sorted({r['results_file'] for r in task_rows if 'results_file' in r})
        if sources:
            out.append('Results: ' + ', '.join(sources))
        for r in task_rows:
            if len(r.get('results_candidates', [])) > 1:
                out.append(f"(!) {r['name']}: {len(r['results_candidates'])} files evaluate this row on its dataset; "
                           f"the newest is shown ({r['results_file']}); the others: "
                           + ', '.join(c for c in r['results_candidates'] if c != r['results_file']))
        out.append('')
    return '\n'.join(out)


def _dataset_text(dataset: Optional[Dict]) -> str:
    if not dataset:
        return 'not recorded'
    return f"{dataset.get('name')} {dataset.get('split')}, {dataset.get('images')} images"


def render_other(records: List[Dict]) -> str:
    """The results that stand on no paper row: measured on other data (yours, the demo's, a subset)."""
    if not records:
        return ''
    out = ['### Other results (not on the datasets of the paper\'s tables: no paper figure to compare with)', '',
           '| Task | Config / model | Dataset | Metrics | File |', '| --- | --- | --- | --- | --- |']
    for record in records:
        values = []
        for key, _, read in METRICS.get(record.get('task'), []):
            value = read(record)
            if value is not None:
                values.append(f'{key} {float(value):.2f}')
        where = record.get('config') or record.get('model') or '-'
        out.append(f"| {record.get('task')} | {where} | {_dataset_text(record.get('dataset'))} | "
                   f"{', '.join(values) or '-'} | {record['source']} |")
    return '\n'.join(out + [''])


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', type=Path, help='folder searched for eval_metrics.json files')
    parser.add_argument('--no-flops', action='store_true', help='skip FLOP counting (the slow part on a CPU)')
    parser.add_argument('--no-cache', action='store_true', help='count FLOPs again instead of reading the cache')
    parser.add_argument('--json', type=Path, help='also write the rows (and other results) as JSON')
    parser.add_argument('--rows', nargs='+', metavar='NAME', help='only these rows (names as in model_zoo.json)')
    args = parser.parse_args(argv)
    known = [e.name for e in model_zoo.entries()]
    unknown = [name for name in args.rows or [] if name not in known]
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; rows: {', '.join(known)}")
    logging.getLogger('fvcore').setLevel(logging.ERROR)
    results = None
    if args.results:
        if not args.results.is_dir():
            parser.error(f'--results {args.results}: no such folder')
        results = read_results(args.results)
    total = len(args.rows or known)
    counter = iter(range(1, total + 1))

    def progress(name: str) -> None:  # one line per row: counting a dense model's FLOPs takes a while on a CPU
        print(f'[paper_tables] {next(counter)}/{total} {name}' + ('' if args.no_flops else ' (counting FLOPs)'),
              file=sys.stderr, flush=True)

    rows = build_rows(flops=not args.no_flops, results=results.rows if results else None,
                      candidates=results.candidates if results else None,
                      cache=None if args.no_cache else CACHE, progress=progress, names=args.rows)
    print(render(rows, with_results=results is not None, flops=not args.no_flops))
    if results is not None:
        print(render_other(results.other))
    if args.json:
        args.json.write_text(json.dumps({'rows': rows, 'other_results': results.other if results else []},
                                        indent=2))
    return rows


if __name__ == '__main__':
    import warnings
    warnings.filterwarnings('ignore')
    main()
