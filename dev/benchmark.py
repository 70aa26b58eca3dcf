"""Inference and training throughput, and peak memory, of MPViT (or any timm model).

    python dev/benchmark.py --models mpvit_small coat_lite_small --batch-size 128 --amp bf16 --channels-last
    python dev/benchmark.py --models mpvit_small --compile --mode infer
    python dev/benchmark.py --models mpvit_small --features --img-size 800 1216 --batch-size 2 --impl both
    python dev/benchmark.py --preset reference-table --models mpvit_small --json results.json

Inference: images/s of ``model(x)`` under ``torch.no_grad`` (``--fuse`` folds the
batch norms first). Training: images/s of a full step (forward, cross-entropy,
backward, AdamW) on random data. With ``--features`` the backbone
(``features_only=True``) is timed and the loss is the sum of its stage-map means,
as for dense-task shapes. Peak memory is the GPU's ``max_memory_allocated``; on
the CPU, timings are for smoke runs only.

Two kinds of ratio are printed, both measured, never assumed:
- ``--impl both`` times MPViT's optimised ops and its textbook ones
  (``mpvit.set_fast_ops(model, False)``: per-head einsum attention, split CRPE convs,
  float32 LayerNorm under autocast, NCHW maps) in the same run, and prints
  fast / textbook per configuration; ``--impl paths`` times the optimised ops with a
  stage's transformer paths as one batch and path by path (the default form batches
  them nowhere until a GPU run shows it faster: ``mpvit.set_batch_paths``), and ``all`` the three.
- ``--reference-file mpvit.py`` (the authors' model file, youngwanLEE/MPViT; not
  shipped here) also times the reference implementation of each MPViT variant in
  the same run (with ``--features``, its stem and stages), and divides ours by it.
  Without it, rows on an H100 at batch 128 and 224x224 are divided by the
  reference's H100 figures of issue #7's table.
  At those settings the ratios are checked against the speed targets.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import importlib.util
import json
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F

import mpvit

# The reference implementation (youngwanLEE/MPViT) on one H100, batch 128, 224x224, images/s (issue #7):
# eager float32, eager bf16 autocast, + channels_last, + torch.compile, and the bf16 AdamW training step
# with its peak memory (GiB).
REFERENCE_H100 = {
    'mpvit_tiny': dict(fp32=3173, bf16=2422, bf16_cl=3595, bf16_cl_compile=9378, train=923, train_gib=9.0),
    'mpvit_xsmall': dict(fp32=2970, bf16=3063, bf16_cl=3511, bf16_cl_compile=4191, train=825, train_gib=11.8),
    'mpvit_small': dict(fp32=2064, bf16=1885, bf16_cl=2335, bf16_cl_compile=3207, train=510, train_gib=16.3),
    'mpvit_base': dict(fp32=1159, bf16=1323, bf16_cl=1387, bf16_cl_compile=3124, train=387, train_gib=32.2),
    'coat_lite_small': dict(fp32=3322, bf16=3865, bf16_cl=3732, bf16_cl_compile=7008, train=1335, train_gib=11.9),
}
# Issue #7's targets, as ratios to the reference column they are stated against.
TARGETS = {'bf16': 2.5, 'bf16_cl': 2.5, 'bf16_cl_compile': 2.0, 'train': 2.0}

# --impl: which of MPViT's formulations are timed, side by side.
# 'fast' is the default: a stage's paths one by one on every device (batched only if installed: mpvit.set_batch_paths).
IMPLS = {'fast': ['fast'], 'textbook': ['textbook'], 'per-path': ['per-path'], 'batched': ['batched'],
         'both': ['textbook', 'fast'], 'paths': ['per-path', 'batched'], 'all': ['textbook', 'per-path', 'batched']}
FAST = ('fast', 'batched')  # the optimised ops, which the targets are for (per-path rows get ratios only)

# (mode, amp, channels_last, compile) of each column of the reference table.
REFERENCE_TABLE_CONFIGS = [
    ('infer', 'none', False, False),
    ('infer', 'bf16', False, False),
    ('infer', 'bf16', True, False),
    ('infer', 'bf16', True, True),
    ('train', 'bf16', False, False),
]


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: str):
    if amp == 'none':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return time.perf_counter() - start


def reference_column(row: Dict) -> Optional[str]:
    """The column of issue #7's H100 table a row is comparable with, or None."""
    if 'H100' not in row['device'] or row['model'] not in REFERENCE_H100:
        return None
    return target_column(row)


def target_column(row: Dict) -> Optional[str]:
    """The reference-table configuration (batch 128, 224x224) a row was timed at, or None."""
    if row['batch_size'] != 128 or row['img_size'] != [224, 224] or row['features'] or row['impl'] not in FAST:
        return None
    if row['mode'] == 'train':
        return 'train' if row['amp'] == 'bf16' and not row['compile'] else None
    if row['amp'] == 'none':
        return 'fp32' if not row['compile'] else None
    if row['amp'] != 'bf16':
        return None
    if row['compile']:
        return 'bf16_cl_compile' if row['channels_last'] else None
    return 'bf16_cl' if row['channels_last'] else 'bf16'


def load_reference(path: str) -> ModuleType:
    """The authors' model file as a module. It registers ``mpvit_*`` with timm, which would replace ours:
    it is imported with registration turned off, and its variants are called by name."""
    import timm.models.registry as timm_registry

    if not Path(path).is_file():
        raise SystemExit(f'--reference-file {path}: no such file')
    spec = importlib.util.spec_from_file_location('mpvit_reference', path)
    module = importlib.util.module_from_spec(spec)
    register = timm_registry.register_model
    timm_registry.register_model = lambda fn: fn
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        raise SystemExit(f"--reference-file {path}: {e} (the authors' file needs einops)") from None
    finally:
        timm_registry.register_model = register
    return module


class ReferenceFeatures(torch.nn.Module):
    """The reference classifier's four stage maps (its stem, patch embeddings and stages; no head), as ours
    with ``features_only=True``: the backbone the dense tasks time."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        model, maps = self.model, []
        x = model.stem(x)
        for embed, stage in zip(model.patch_embed_stages, model.mhca_stages):
            x = stage(embed(x))
            maps.append(x)
        return maps


def create(name: str, impl: str, features: bool, reference: Optional[ModuleType] = None) -> torch.nn.Module:
    """Model ``name`` in one of the formulations of ``--impl`` or the reference's (``features``: the backbone)."""
    if impl == 'reference':
        model = getattr(reference, name)()
        return ReferenceFeatures(model) if features else model
    model = timm.create_model(name, **(dict(features_only=True) if features else {}))
    if impl == 'textbook':
        mpvit.set_fast_ops(model, False)
    elif impl in ('per-path', 'batched'):
        mpvit.set_batch_paths(model, 'never' if impl == 'per-path' else 'always')
    return model


def benchmark(name: str, args: argparse.Namespace, mode: str, amp: str, channels_last: bool, compile_model: bool,
              impl: str, reference: Optional[ModuleType] = None) -> Dict:
    device = torch.device(args.device)
    model = create(name, impl, args.features, reference).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    height, width = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    x = torch.randn(args.batch_size, 3, height, width, device=device).to(memory_format=memory_format)
    if mode == 'infer':
        model.eval()
        if args.fuse and impl != 'reference' and hasattr(model, 'fuse'):
            model.fuse()
    run_model = torch.compile(model, mode=args.compile_mode) if compile_model else model

    if mode == 'infer':
        def step():
            with torch.no_grad(), _autocast(device, amp):
                run_model(x)
    else:
        model.train()
        target = torch.randint(0, 1000, (args.batch_size,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(enabled=amp == 'fp16')

        def step():
            with _autocast(device, amp):
                out = run_model(x)
                loss = sum(o.float().mean() for o in out) if args.features else F.cross_entropy(out.float(), target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = _timed(step, device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else float('nan')
    top = profile(step, device, args.profile) if args.profile else None
    row = dict(model=name, impl=impl, mode=mode, batch_size=args.batch_size, img_size=[height, width], amp=amp,
               channels_last=channels_last, compile=compile_model,
               fused=bool(args.fuse and mode == 'infer' and impl != 'reference'),
               features=args.features, images_per_s=args.iters * args.batch_size / elapsed, peak_memory_gib=peak,
               device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
               torch=torch.__version__)
    if top is not None:
        row['profile'] = top
    return row


def profile(step, device: torch.device, top: int, steps: int = 3) -> List[Dict]:
    """The ``top`` operators / kernels by self time (device time on a GPU) over ``steps`` more steps:
    name, milliseconds per step, calls per step and share of the step's total."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    attr = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(name=e.key, ms_per_step=getattr(e, attr) / 1e3 / steps, calls_per_step=e.count / steps,
                 share=getattr(e, attr) / total) for e in events[:top]]


def render_profile(row: Dict) -> str:
    title = f"{row['model']} {row['impl']} {row['mode']} batch {row['batch_size']} {row['amp']}"
    lines = [f'top self {"device" if row["device"] != "cpu" else "CPU"} time: {title}',
             '| share | ms / step | calls / step | op or kernel |', '| --- | --- | --- | --- |']
    lines += [f"| {p['share']:.1%} | {p['ms_per_step']:.2f} | {p['calls_per_step']:g} | {p['name'][:90]} |"
              for p in row['profile']]
    return '\n'.join(lines)


def add_ratios(rows: List[Dict]) -> None:
    """Fill ``vs_textbook`` and ``vs_reference`` (``reference_source``: 'same run' or issue #7's H100 table),
    and ``target`` / ``meets_target`` at the settings the targets are stated for. Per-path rows (the CPU's
    default form) get ``vs_reference`` against a reference timed in the same run, and no target."""
    def key(r: Dict) -> Tuple:
        return (r['model'], r['mode'], r['amp'], r['channels_last'], r['compile'], r['features'], r['batch_size'],
                tuple(r['img_size']))

    slow = {(key(r), r['fused']): r for r in rows if r['impl'] == 'textbook'}
    per_path = {(key(r), r['fused']): r for r in rows if r['impl'] == 'per-path'}
    measured = {key(r): r for r in rows if r['impl'] == 'reference'}  # ours, fused or not, against it
    for row in rows:
        if row['impl'] == 'per-path' and key(row) in measured:  # the CPU's default form: divided, not judged
            row['vs_reference'] = row['images_per_s'] / measured[key(row)]['images_per_s']
            row['reference_source'] = 'same run'
        if row['impl'] not in FAST:
            continue
        if (key(row), row['fused']) in slow:
            row['vs_textbook'] = row['images_per_s'] / slow[key(row), row['fused']]['images_per_s']
        if (key(row), row['fused']) in per_path:
            row['vs_per_path'] = row['images_per_s'] / per_path[key(row), row['fused']]['images_per_s']
        if key(row) in measured:
            column = target_column(row)
            ref_speed, ref_peak = measured[key(row)]['images_per_s'], measured[key(row)]['peak_memory_gib']
            row['reference_source'] = 'same run'
        else:
            column = reference_column(row)
            if column is None:
                continue
            ref_speed, ref_peak = REFERENCE_H100[row['model']][column], REFERENCE_H100[row['model']]['train_gib']
            row['reference_source'] = 'issue #7 H100 table'
        row['vs_reference'] = row['images_per_s'] / ref_speed
        if column in TARGETS and row['model'].startswith('mpvit'):
            row['reference_column'] = column
            row['target'] = TARGETS[column]
            row['meets_target'] = row['vs_reference'] >= TARGETS[column]
            if column == 'train':
                row['reference_peak_gib'] = ref_peak
                row['meets_target'] = row['meets_target'] and not row['peak_memory_gib'] > ref_peak


def _speed(images_per_s: float) -> str:
    """Three significant figures below 100 images/s (CPU rows), one decimal above."""
    return f'{images_per_s:.1f}' if images_per_s >= 100 else f'{images_per_s:.3g}'


def _ratio(row: Dict, name: str) -> str:
    return f'{row[name]:.2f}x' if name in row else ''


def render(rows: List[Dict]) -> str:
    header = ['model', 'impl', 'mode', 'batch', 'size', 'amp', 'channels_last', 'compile', 'img/s', 'peak GiB',
              'vs textbook', 'vs per-path', 'vs reference', 'target']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for r in rows:
        target = ''
        if 'target' in r:
            target = f"{r['target']:.1f}x{' + mem' if r['mode'] == 'train' else ''}: " \
                     f"{'met' if r['meets_target'] else 'NOT met'}"
        name = r['model'] + (' (features)' if r['features'] else '') + (' (fused)' if r['fused'] else '')
        cells = [name, r['impl'], r['mode'], str(r['batch_size']), f"{r['img_size'][0]}x{r['img_size'][1]}", r['amp'],
                 str(r['channels_last']), str(r['compile']), _speed(r['images_per_s']),
                 f"{r['peak_memory_gib']:.2f}", _ratio(r, 'vs_textbook'), _ratio(r, 'vs_per_path'),
                 _ratio(r, 'vs_reference') + (f" ({r['reference_source']})" if 'reference_source' in r else ''),
                 target]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['mpvit_small'], help='timm model names')
    parser.add_argument('--mode', choices=['infer', 'train', 'both'], default='both')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], help='S or H W')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='bf16')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--compile-mode', default=None, help="torch.compile mode, e.g. 'max-autotune'")
    parser.add_argument('--fuse', action='store_true', help='inference: fold batch norms into convs (MPViT.fuse)')
    parser.add_argument('--features', action='store_true', help='time the features_only backbone')
    parser.add_argument('--impl', choices=list(IMPLS), default='fast',
                        help="MPViT's ops: the default optimised ones (a stage's paths as one batch on a GPU, one "
                             "by one on the CPU), the textbook ones, the optimised ones with the paths batched or "
                             "path by path on any device ('batched', 'per-path'), or several side by side: 'both' "
                             "(textbook, fast), 'paths' (per-path, batched), 'all'")
    parser.add_argument('--preset', choices=['reference-table'],
                        help="reference-table: issue #7's five columns (overrides --mode/--amp/--channels-last/"
                             "--compile)")
    parser.add_argument('--reference-file', help="the authors' mpvit.py: time its variants in the same run")
    parser.add_argument('--profile', type=int, default=0, metavar='K',
                        help='after timing, profile 3 more steps and print the top K ops / kernels by self time')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--iters', type=int, default=50)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', help='write the rows to this file')
    args = parser.parse_args(argv)
    if len(args.img_size) not in (1, 2):
        parser.error('--img-size takes one or two numbers')
    torch.backends.cudnn.benchmark = True  # fixed shapes, as in timm's benchmark
    if args.preset == 'reference-table':
        configs = REFERENCE_TABLE_CONFIGS
    else:
        modes = ['infer', 'train'] if args.mode == 'both' else [args.mode]
        configs = [(mode, args.amp, args.channels_last, args.compile) for mode in modes]
    impls = IMPLS[args.impl]
    reference = load_reference(args.reference_file) if args.reference_file else None
    rows = []
    for name in args.models:
        mpvit_impls = impls + (['reference'] if reference is not None and hasattr(reference, name) else [])
        for config in configs:
            for impl in mpvit_impls if name.startswith('mpvit') else ['fast']:
                rows.append(benchmark(name, args, *config, impl=impl, reference=reference))
                print(render(rows[-1:]).splitlines()[-1], flush=True)
    add_ratios(rows)
    for row in rows:
        if 'profile' in row:
            print(render_profile(row))
    print(render(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
