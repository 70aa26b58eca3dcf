"""Export an MPViT classifier or feature extractor to ONNX, checked against PyTorch with onnxruntime.

    python tools/export_onnx.py mpvit_small model.onnx --weights released
    python tools/export_onnx.py mpvit_tiny features.onnx --features-only --size 512x1024 --weights checkpoint.pth
    python tools/export_onnx.py mpvit_tiny depth.onnx --features-only --stem-levels     # + strides 2 and 4
    python tools/export_onnx.py mpvit_small model.onnx --exporter torchscript    # torch.onnx's older exporter

The model is exported in eval mode with its batch norms folded (timm's ``reparameterize_model``), traced at
``--size`` (``H W``, ``HxW`` or one number for a square) with the batch size, height and width dynamic:
input ``images`` (ImageNet-normalised, NCHW, dims ``batch``, ``height``, ``width``); outputs ``logits``, or
``stage2`` ... ``stage5`` with ``--features-only`` (dims ``height/4`` ... ``height/32``), led by ``stem1``
(stride 2) and ``stem2`` (stride 4) with ``--stem-levels``. Heights and widths are meant to be multiples of 32;
other sizes run as in PyTorch (each map ceil(size / stride)). The file is then run with onnxruntime at the
export size and at a second, non-square size of another batch, and compared with PyTorch: a difference
above ``--tolerance`` stops with an error (an exporter's mistranslation, with its traceback), and no file is
left. The result is one self-contained ``.onnx`` file (no external data), of standard ai.onnx ops only at
``--opset`` (printed). Needs ``onnx`` and ``onnxruntime`` (and ``onnxscript`` for the default dynamo exporter).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os
import re
from pathlib import Path
from typing import List, Sequence, Tuple

import timm
import torch
from timm.utils import reparameterize_model

import mpvit  # noqa: F401  (registers the models)
from mpvit import model_zoo
from mpvit.checkpoint import load_backbone_weights, local_checkpoint
from mpvit.errors import InvalidInputError
from mpvit.models.mpvit import STEM_LEVELS
from mpvit.training import user_errors_in_one_line

STEM_OUTPUTS = ('stem1', 'stem2')  # the stride-2 and stride-4 maps of the stem ('stem.0' / 'stem.1' levels)


def build(name: str, weights: str = '', features_only: bool = False, **model_kwargs) -> torch.nn.Module:
    """The model to export, eval mode, batch norms folded. A classifier needs a checkpoint with its classifier;
    a feature extractor takes the backbone of any released format (as timm's ``pretrained=True``).
    ``model_kwargs`` go to ``timm.create_model`` (``out_indices=('stem.0', 'stem.1', 0, 1, 2, 3)``: the stem
    maps too)."""
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
    """``logits``, or a name per map: ``stem1`` / ``stem2`` for the stem's, ``stage2`` ... for the stages'."""
    if not features_only:
        return ['logits']
    return [STEM_OUTPUTS[STEM_LEVELS.index(i['module'])] if i['module'] in STEM_LEVELS
            else f"stage{int(i['module'].rsplit('.', 1)[1]) + 2}" for i in model.feature_info.get_dicts()]


def _name_dims(path: str | os.PathLike, model: torch.nn.Module, names: Sequence[str]) -> None:
    """The same dynamic dimension names from either exporter (``batch``, ``height``, ``width``, ``height/4``
    ...), for TensorRT profiles and readers of the graph; saved back as one file."""
    import onnx

    graph = onnx.load(str(path))
    dims = {'images': ['batch', None, 'height', 'width'], 'logits': ['batch', None]}
    if names != ['logits']:
        for name, info in zip(names, model.feature_info.get_dicts()):
            dims[name] = ['batch', None, f"height/{info['reduction']}", f"width/{info['reduction']}"]
    for value in list(graph.graph.input) + list(graph.graph.output):
        for dim, label in zip(value.type.tensor_type.shape.dim, dims.get(value.name, [])):
            if label is not None:
                dim.dim_param = label
    graph.graph.ClearField('value_info')  # the exporter's own names for inner shapes; runtimes infer them again
    onnx.save_model(graph, str(path), save_as_external_data=False)


def export(model: torch.nn.Module, path: str | os.PathLike, size: int | Tuple[int, int], names: Sequence[str],
           exporter: str = 'dynamo', opset: int = 18) -> None:
    """``torch.onnx.export`` with a dynamic batch size, height and width, by either of torch's exporters, into
    one file (the dynamo exporter's weights inside it, not in a separate ``.data`` file)."""
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        if exporter == 'dynamo':
            dim = torch.export.Dim
            # Multiples of 32 by construction: the stride-2 steps then divide exactly, with no guards to add.
            shapes = {'x': {0: dim('batch', min=1, max=4096), 2: 32 * dim('h32', min=1, max=1024),
                            3: 32 * dim('w32', min=1, max=1024)}}
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=['images'], output_names=list(names),
                              dynamic_shapes=shapes, opset_version=opset, external_data=False)
        else:
            axes = {'images': {0: 'batch', 2: 'height', 3: 'width'},
                    **{name: {0: 'batch'} if name == 'logits' else {0: 'batch', 2: f'{name}_h', 3: f'{name}_w'}
                       for name in names}}
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['images'],
                              output_names=list(names), dynamic_axes=axes, opset_version=opset)
    _name_dims(path, model, names)


def graph_ops(path: str | os.PathLike) -> Tuple[int, List[str], List[str]]:
    """The file's ai.onnx opset, the op types its graph uses, and those that are not standard ai.onnx ops at
    that opset (custom domains, local functions): what a runtime such as TensorRT must support."""
    import onnx

    graph = onnx.load(str(path))
    opset = next(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx'))
    ops = sorted({node.op_type for node in graph.graph.node})
    other = sorted({f'{n.domain}::{n.op_type}' for n in graph.graph.node if n.domain not in ('', 'ai.onnx')}
                   | {f'{n.op_type} (no ai.onnx op)' for n in graph.graph.node
                      if n.domain in ('', 'ai.onnx') and not onnx.defs.has(n.op_type)}
                   | {f'function {f.name}' for f in graph.functions})
    return opset, ops, other


def check_shapes(size: Tuple[int, int]) -> List[Tuple[int, int, int]]:
    """The (batch, height, width) the check runs at: the export size, then a second, non-square size."""
    height, width = size
    return [(1, height, width), (3, height + 32, width + 64)]


@torch.no_grad()
def max_difference(model: torch.nn.Module, path: str | os.PathLike, size: int | Tuple[int, int],
                   shapes: Sequence[Tuple[int, int, int]] | None = None) -> float:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's, on random images of
    ``shapes`` (default :func:`check_shapes`: the export size, and another batch at a non-square size)."""
    import onnxruntime

    size = (size, size) if isinstance(size, int) else tuple(size)
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    worst = 0.0
    for batch, height, width in shapes or check_shapes(size):
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
        expected = model(x)
        expected = expected if isinstance(expected, (list, tuple)) else [expected]
        outputs = session.run(None, {'images': x.numpy()})
        if len(outputs) != len(expected):
            return float('inf')
        for ours, theirs in zip(expected, outputs):
            if tuple(ours.shape) != theirs.shape:
                return float('inf')
            worst = max(worst, float((ours - torch.from_numpy(theirs)).abs().max()))
    return worst


def parse_size(text: Sequence[str]) -> Tuple[int, int]:
    """``--size``: ``H W``, ``HxW`` or one number (a square), each a positive multiple of 32."""
    parts = re.split(r'[xX]', text[0]) if len(text) == 1 else list(text)
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise InvalidInputError(f"--size {' '.join(text)}: expected H W, HxW or one number of pixels")
    height, width = int(parts[0]), int(parts[1])
    if min(height, width) < 32 or height % 32 or width % 32:
        raise InvalidInputError(f'--size {height}x{width}: height and width must be positive multiples of 32')
    return height, width


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base')
    parser.add_argument('output', type=Path, help='the .onnx file to write')
    parser.add_argument('--weights', default='', help="checkpoint file or URL, or 'released' (default: random)")
    parser.add_argument('--features-only', action='store_true', help='the four stage maps instead of logits')
    parser.add_argument('--stem-levels', action='store_true',
                        help="with --features-only: the stem's stride-2 and stride-4 maps first (stem1, stem2)")
    parser.add_argument('--size', nargs='+', default=['224'],
                        help='trace size: H W, HxW or one number (multiples of 32; the file takes any size)')
    parser.add_argument('--exporter', choices=['dynamo', 'torchscript'], default='dynamo')
    parser.add_argument('--opset', type=int, default=18)
    parser.add_argument('--tolerance', type=float, default=1e-3, help='largest accepted absolute difference')
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f"{args.model}: unknown model; MPViT variants: {', '.join(timm.list_models('mpvit_*'))}")
    try:
        args.size = parse_size(args.size)
    except InvalidInputError as e:
        parser.error(str(e))
    if args.stem_levels and not args.features_only:
        parser.error('--stem-levels needs --features-only')
    return args


def main(argv: Sequence[str] | None = None) -> float:
    args = parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InvalidInputError('onnxruntime is not installed: pip install onnx onnxruntime onnxscript') from None
    levels = dict(out_indices=('stem.0', 'stem.1', 0, 1, 2, 3)) if args.stem_levels else {}
    model = build(args.model, args.weights, args.features_only, **levels)
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
    opset, ops, other = graph_ops(args.output)
    shapes = ', '.join(f'{b}x3x{h}x{w}' for b, h, w in check_shapes(args.size))
    print(f'wrote {args.output.resolve()} (one file, {args.output.stat().st_size / 2 ** 20:.1f} MiB; {args.exporter} '
          f'exporter; outputs {", ".join(names)}; dynamic batch, height, width); onnxruntime vs PyTorch at {shapes}: '
          f'max abs difference {difference:.2e}')
    print(f'opset {opset}, ' + (f'ops outside ai.onnx: {", ".join(other)}' if other else 'ai.onnx ops only')
          + f': {", ".join(ops)}')
    return difference


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
