"""Export an MPViT classifier or feature extractor to ONNX, checked against PyTorch with onnxruntime.

    python tools/export_onnx.py mpvit_small model.onnx --weights released
    python tools/export_onnx.py mpvit_tiny features.onnx --features-only --size 512 --weights checkpoint.pth
    python tools/export_onnx.py mpvit_small model.onnx --exporter torchscript    # torch.onnx's older exporter

The model is exported in eval mode with its batch norms folded (timm's ``reparameterize_model``), for
images of ``--size`` pixels and any batch size. Input ``images`` (ImageNet-normalised, NCHW); outputs
``logits``, or ``stage2`` ... ``stage5`` with ``--features-only``. The file is then run with onnxruntime on
random images of two batch sizes and compared with PyTorch: a difference above ``--tolerance`` stops with
an error (an exporter's mistranslation, with its traceback), and no file is left. Needs ``onnx`` and
``onnxruntime`` (and ``onnxscript`` for the default dynamo exporter).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os
from pathlib import Path
from typing import List, Sequence

import timm
import torch
from timm.utils import reparameterize_model

import mpvit  # noqa: F401  (registers the models)
from mpvit import model_zoo
from mpvit.checkpoint import load_backbone_weights, local_checkpoint
from mpvit.errors import InvalidInputError
from mpvit.training import user_errors_in_one_line


def build(name: str, weights: str = '', features_only: bool = False, **model_kwargs) -> torch.nn.Module:
    """The model to export, eval mode, batch norms folded. A classifier needs a checkpoint with its classifier;
    a feature extractor takes the backbone of any released format (as timm's ``pretrained=True``).
    ``model_kwargs`` go to ``timm.create_model``."""
    if features_only:
        file = local_checkpoint(model_zoo.resolve(weights, model=name)) if weights else None
        model = timm.create_model(name, features_only=True, pretrained=bool(file),
                                  pretrained_cfg_overlay=dict(file=file) if file else None, **model_kwargs)
    else:
        model = timm.create_model(name, **model_kwargs)
        if weights:
            load_backbone_weights(model, model_zoo.resolve(weights, model=name), head='require')
    return reparameterize_model(model.eval())


def output_names(model: torch.nn.Module, features_only: bool) -> List[str]:
    return [f'stage{i + 2}' for i in range(len(model.feature_info))] if features_only else ['logits']


def export(model: torch.nn.Module, path: str | os.PathLike, size: int, names: Sequence[str],
           exporter: str = 'dynamo', opset: int = 18) -> None:
    """``torch.onnx.export`` with a dynamic batch dimension, by either of torch's exporters."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        if exporter == 'dynamo':
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=['images'], output_names=list(names),
                              dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1, max=4096)}},
                              opset_version=opset)
        else:
            axes = {'images': {0: 'batch'}, **{name: {0: 'batch'} for name in names}}
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['images'],
                              output_names=list(names), dynamic_axes=axes, opset_version=opset)


@torch.no_grad()
def max_difference(model: torch.nn.Module, path: str | os.PathLike, size: int) -> float:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's, on random images of two
    batch sizes (the exported batch dimension is dynamic)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        expected = model(x)
        expected = expected if isinstance(expected, (list, tuple)) else [expected]
        outputs = session.run(None, {'images': x.numpy()})
        for ours, theirs in zip(expected, outputs):
            worst = max(worst, float((ours - torch.from_numpy(theirs)).abs().max()))
    return worst


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base')
    parser.add_argument('output', type=Path, help='the .onnx file to write')
    parser.add_argument('--weights', default='', help="checkpoint file or URL, or 'released' (default: random)")
    parser.add_argument('--features-only', action='store_true', help='the four stage maps instead of logits')
    parser.add_argument('--size', type=int, default=224, help='image size (pixels, a multiple of 32)')
    parser.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo')
    parser.add_argument('--opset', type=int, default=18)
    parser.add_argument('--tolerance', type=float, default=1e-3, help='largest accepted absolute difference')
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f"{args.model}: unknown model; MPViT variants: {', '.join(timm.list_models('mpvit_*'))}")
    if args.size < 32 or args.size % 32:
        parser.error(f'--size {args.size}: must be a positive multiple of 32')
    return args


def main(argv: Sequence[str] | None = None) -> float:
    args = parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InvalidInputError('onnxruntime is not installed: pip install onnx onnxruntime onnxscript') from None
    model = build(args.model, args.weights, args.features_only)
    names = output_names(model, args.features_only)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + '.partial')
    export(model, partial, args.size, names, args.exporter, args.opset)
    difference = max_difference(model, partial, args.size)
    if not difference <= args.tolerance:
        partial.unlink()
        # Not the user's doing: an exporter that mistranslates an op. A traceback, not one line.
        raise RuntimeError(f'{args.output}: onnxruntime differs from PyTorch by {difference:.3g} '
                           f'(> --tolerance {args.tolerance:g}); not written')
    os.replace(partial, args.output)
    print(f'wrote {args.output.resolve()} ({args.exporter} exporter; outputs {", ".join(names)}); '
          f'onnxruntime vs PyTorch: max abs difference {difference:.2e}')
    return difference


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
