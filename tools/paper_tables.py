"""Rebuild the four tables of the authors' README (= the paper's) from this repository's configs.

    python tools/paper_tables.py                      # params + FLOPs of every row, live
    python tools/paper_tables.py --results output/    # + the metrics our evaluation commands wrote
    python tools/paper_tables.py --no-flops --json tables.json

Each row is one released checkpoint (``mpvit/model_zoo.json``). Its model is built from our config for that
row; #params are its trainable parameters (shared ones once) next to the README's rounded figure. FLOPs follow
each table's convention, which the output states. With ``--results DIR`` every ``eval_metrics.json`` under
DIR (written by classification/main.py, detectron2/train_net.py, semantic_segmentation/tools/test.py and
deformable_detr/main.py) is placed on the row it evaluates, with the difference to the README's figure.
FLOP counts are cached in ``.cache/paper_tables`` (keyed by the model's structure and the package code).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without an install of this checkout
from mpvit import model_zoo, set_fast_ops  # noqa: E402
from mpvit.errors import InvalidInputError  # noqa: E402
from mpvit.model_zoo import ZooEntry  # noqa: E402

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
        for part in ('backbone', 'decode_head', 'auxiliary_head'):
            cfg.model[part].norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN's count, no process group
        return MODELS.build(cfg.model).eval()
    if entry.task == 'deformable_detr':
        import yaml

        from mpvit.deformable_detr import build_deformable_detr
        with open(config) as f:
            c = yaml.safe_load(f)
        return build_deformable_detr(c['backbone'], c['num_classes'], c['num_queries'],
                                     c['num_feature_levels']).eval()
    raise ValueError(f'{entry.name}: unknown task {entry.task!r}')


def count_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters, each shared tensor once (as ``model.parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
        from mmengine.analysis import get_model_complexity_info

        class DecodeOnly(torch.nn.Module):  # mmseg's get_flops: backbone + decode head, no auxiliary head
            def __init__(self, segmentor):
                super().__init__()
                self.segmentor = segmentor

            def forward(self, x):
                return self.segmentor._forward(x)

        info = get_model_complexity_info(DecodeOnly(model), inputs=(torch.zeros(1, 3, *SEGMENTATION_SIZE),),
                                         show_table=False, show_arch=False)
        return {'gflops': info['flops'] / 1e9}
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

def read_results(root: Path) -> Dict[str, Dict]:
    """``eval_metrics.json`` files under ``root`` by the row they evaluate (the newest file wins)."""
    found: Dict[str, Dict] = {}
    for path in sorted(root.rglob('eval_metrics.json'), key=lambda p: p.stat().st_mtime):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidInputError(f'{path}: not a readable metrics file ({e})') from None
        row = record.get('paper_row')
        if row:
            found[row] = dict(record, source=str(path))
    return found


# ------------------------------------------------------------------------------------------- tables

def build_rows(flops: bool = True, results: Optional[Dict[str, Dict]] = None, cache: Optional[Path] = CACHE,
               progress: Callable[[str], None] = lambda _: None, names: Optional[List[str]] = None) -> List[Dict]:
    """One row per released checkpoint (those in ``names`` only, when given)."""
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
            cells += [_num(row[key], '.2f'), _num(row.get(f'{key}_diff'), '+.2f')]
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
        out.append('')
    return '\n'.join(out)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--results', type=Path, help='folder searched for eval_metrics.json files')
    parser.add_argument('--no-flops', action='store_true', help='skip FLOP counting (the slow part on a CPU)')
    parser.add_argument('--no-cache', action='store_true', help='count FLOPs again instead of reading the cache')
    parser.add_argument('--json', type=Path, help='also write the rows as JSON')
    args = parser.parse_args(argv)
    logging.getLogger('fvcore').setLevel(logging.ERROR)
    results = None
    if args.results:
        if not args.results.is_dir():
            parser.error(f'--results {args.results}: no such folder')
        results = read_results(args.results)
    rows = build_rows(flops=not args.no_flops, results=results, cache=None if args.no_cache else CACHE,
                      progress=lambda name: print(f'[paper_tables] {name}', file=sys.stderr, flush=True))
    print(render(rows, with_results=results is not None, flops=not args.no_flops))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == '__main__':
    import warnings
    warnings.filterwarnings('ignore')
    main()
