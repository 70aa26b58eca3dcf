"""Inference and training throughput, and peak memory, of MPViT (or any timm model).

    python tools/benchmark.py --models mpvit_small coat_lite_small --batch-size 128 --amp bf16 --channels-last
    python tools/benchmark.py --models mpvit_small --compile --mode infer
    python tools/benchmark.py --models mpvit_small --features --img-size 800 1216 --batch-size 2   # Detectron2 shape

Inference: images/s of ``model(x)`` under ``torch.no_grad``. Training: images/s of a
full step (forward, cross-entropy, backward, AdamW) on random data. With
``--features`` the backbone (``features_only=True``) is timed and the loss is the
sum of its stage-map means, as for dense-task shapes. Peak memory is the GPU's
``max_memory_allocated``; on the CPU, timings are for smoke runs only.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F

import mpvit  # noqa: F401  (registers the models)


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


def benchmark(name: str, args: argparse.Namespace, mode: str) -> Dict:
    device = torch.device(args.device)
    kwargs = dict(features_only=True) if args.features else {}
    model = timm.create_model(name, **kwargs).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    height, width = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    x = torch.randn(args.batch_size, 3, height, width, device=device).to(memory_format=memory_format)
    run_model = torch.compile(model) if args.compile else model

    def loss_of(out) -> torch.Tensor:
        if args.features:
            return sum(o.float().mean() for o in out)
        return F.cross_entropy(out.float(), target)

    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, args.amp):
                run_model(x)
    else:
        model.train()
        target = torch.randint(0, 1000, (args.batch_size,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(enabled=args.amp == 'fp16')

        def step():
            with _autocast(device, args.amp):
                loss = loss_of(run_model(x))
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elapsed = _timed(step, device, args.warmup, args.iters)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else float('nan')
    return dict(model=name, mode=mode, batch_size=args.batch_size, img_size=[height, width], amp=args.amp,
                channels_last=args.channels_last, compile=args.compile, features=args.features,
                images_per_s=args.iters * args.batch_size / elapsed, peak_memory_gib=peak,
                device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
                torch=torch.__version__)


def render(rows: List[Dict]) -> str:
    lines = ['| model | mode | batch | size | amp | channels_last | compile | img/s | peak GiB |',
             '|' + ' --- |' * 9]
    for r in rows:
        lines.append(f"| {r['model']}{' (features)' if r['features'] else ''} | {r['mode']} | {r['batch_size']} "
                     f"| {r['img_size'][0]}x{r['img_size'][1]} | {r['amp']} | {r['channels_last']} | {r['compile']} "
                     f"| {r['images_per_s']:.1f} | {r['peak_memory_gib']:.2f} |")
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
    parser.add_argument('--features', action='store_true', help='time the features_only backbone')
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--iters', type=int, default=50)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--json', help='write the rows to this file')
    args = parser.parse_args(argv)
    if len(args.img_size) not in (1, 2):
        parser.error('--img-size takes one or two numbers')
    modes = ['infer', 'train'] if args.mode == 'both' else [args.mode]
    rows = [benchmark(name, args, mode) for name in args.models for mode in modes]
    print(render(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
