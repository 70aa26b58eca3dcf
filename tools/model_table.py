"""Print the README's ImageNet table with #params and FLOPs computed live from the models.

    python tools/model_table.py [--json table.json]

Accuracy cannot be measured here (no ImageNet); that column is the one the
authors report, shown next to the live figures of what this repository builds.
FLOPs are fvcore's count (one multiply-add = one FLOP) at 1x3x224x224, eval mode.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

import timm
import torch
from fvcore.nn import FlopCountAnalysis

import mpvit  # noqa: F401  (registers the models)

# As stated in the authors' README: top-1 (%), #params (M), GFLOPs.
REPORTED = {
    'mpvit_tiny': (78.2, 5.8, 1.6),
    'mpvit_xsmall': (80.9, 10.5, 2.9),
    'mpvit_small': (83.0, 22.8, 4.7),
    'mpvit_base': (84.3, 74.8, 16.4),
}


def measure(name: str, resolution: int = 224) -> Dict:
    model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = FlopCountAnalysis(model, torch.zeros(1, 3, resolution, resolution))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    acc, params_m, gflops = REPORTED[name]
    return dict(model=name, resolution=resolution, params=params, flops=int(flops.total()),
                reported_acc1=acc, reported_params_m=params_m, reported_gflops=gflops)


def render(rows: List[Dict]) -> str:
    head = ('| Model | Resolution | Acc@1 (reported) | #Params (live) | #Params (reported) '
            '| FLOPs (live) | FLOPs (reported) |')
    lines = [head, '|' + ' --- |' * 7]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['resolution']}x{r['resolution']} | {r['reported_acc1']:.1f} "
            f"| {r['params'] / 1e6:.2f}M ({r['params']:,}) | {r['reported_params_m']}M "
            f"| {r['flops'] / 1e9:.2f}G ({r['flops']:,}) | {r['reported_gflops']}G |")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--json', help='also write the rows to this JSON file')
    args = parser.parse_args()
    rows = [measure(name) for name in REPORTED]
    print(render(rows))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)


if __name__ == '__main__':
    main()
