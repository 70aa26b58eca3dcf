"""Device-independent cost of MPViT: dispatched ops, bytes written and saved activations, ours vs the reference.

    python dev/count_ops.py --reference-file mpvit.py                       # MPViT-S, bf16, batch 8, 224x224
    python dev/count_ops.py --models mpvit_tiny mpvit_small --reference-file mpvit.py --json ops.json
    python dev/count_ops.py --models mpvit_small --impl both                # also the textbook ops

On a GPU, eager PyTorch spends about 10-20 us of CPU per dispatched op, and most of
MPViT's stage-3/4 kernels are about that short: eager MPViT is bound by the number
of ops it launches, then by the bytes its kernels write. Both are counted here on
any device (the CPU is fine), with every aten op seen by a ``TorchDispatchMode``
under autocast:

- ``ops``: the aten ops that are not views (each runs a kernel: the count the
  targets are stated in);
- ``dispatched``: every aten op, views included (each also costs dispatcher time);
- ``MiB written``: the bytes the ops write, outputs and arguments written in place
  (the in-place foreach ops return nothing), as the ops' schemas declare them (batch
  norm's running-statistics updates are not declared: not counted, on either side);
- ``saved MiB``: activations autograd keeps for the backward (distinct storages,
  the parameters themselves excluded), for the training step.

A training step is forward, loss and backward (no optimiser: it is the same per
parameter for both files); inference is ``model(x)`` under ``no_grad``. With
``--reference-file`` (the authors' ``mpvit.py``) the reference's variants are
counted in the same run, and each of our rows prints its ratios to them. For the
default formulation, ``weight stacking`` (on the inference row) is the part of
one forward that stacks the paths' parameters: what storing them stacked would
save an inference at most.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import json
from collections import Counter
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from benchmark import FAST, IMPLS, create, load_reference  # noqa: E402  (dev/, beside this file: the path a script's folder is on)
from torch.utils._python_dispatch import TorchDispatchMode

from mpvit.models.batched_paths import BatchedMHCAStage
from mpvit.models.mpvit import _autocast_dtype

# Issue #23's targets, ours / reference.
TARGETS = {'train_ops': 0.5, 'infer_ops': 0.5, 'train_written': 0.8, 'train_saved': 1.0}


# Ops that run no kernel besides views: metadata only, or an allocation (the op that fills it is counted).
NO_KERNEL = ('aten::detach', 'aten::lift_fresh', 'aten::_unsafe_view', 'aten::empty', 'aten::empty_like',
             'aten::new_empty', 'aten::empty_strided', 'aten::new_empty_strided')


def _is_view(func: torch._ops.OpOverload) -> bool:
    """Ops that return a view, only metadata or uninitialised memory: they run no kernel."""
    return func.is_view or func._schema.name in NO_KERNEL


class OpCounter(TorchDispatchMode):
    """Counts every aten op, the ones that are not views, and the bytes those write."""

    def __init__(self) -> None:
        super().__init__()
        self.dispatched = Counter()
        self.kernels = 0
        self.bytes_written = 0
        self.bytes_by_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split('::')[-1]
        self.dispatched[name] += 1
        if not _is_view(func):
            self.kernels += 1
            for t in _written(func, args, kwargs or {}, out):
                self.bytes_written += t.numel() * t.element_size()
                self.bytes_by_op[name] += t.numel() * t.element_size()
        return out


def _written(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: object) -> List[torch.Tensor]:
    """The tensors an op writes: its outputs and the arguments it mutates (``_foreach_copy_`` and the other
    in-place foreach ops return nothing), each once."""
    mutated = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            mutated.append(kwargs[argument.name] if argument.name in kwargs else
                           args[i] if i < len(args) else None)
    written: Dict[int, torch.Tensor] = {}
    for t in torch.utils._pytree.tree_leaves([out, mutated]):
        if isinstance(t, torch.Tensor):
            written[id(t)] = t
    return list(written.values())


def _autocast(device: torch.device, amp: str):
    if amp == 'none':
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def count(model: torch.nn.Module, x: torch.Tensor, mode: str, amp: str, features: bool = False) -> Dict:
    """Ops, kernels, bytes written and (training) saved activation bytes of one step of ``model`` on ``x``."""
    device = x.device
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    own.add(x.untyped_storage().data_ptr())
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and t.device.type != 'meta':
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    counter = OpCounter()
    if mode == 'infer':
        model.eval()
        with torch.no_grad(), _autocast(device, amp), counter:
            model(x)
    else:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
            with _autocast(device, amp):
                out = model(x)
                loss = sum(o.float().mean() for o in out) if features else F.cross_entropy(
                    out.float(), torch.zeros(x.shape[0], dtype=torch.long, device=device))
            loss.backward()
    return dict(ops=counter.kernels, dispatched=sum(counter.dispatched.values()),
                mib_written=counter.bytes_written / 2 ** 20,
                saved_mib=sum(saved.values()) / 2 ** 20 if mode == 'train' else None,
                top_ops=dict(counter.dispatched.most_common(12)),
                top_mib_written={k: v / 2 ** 20 for k, v in counter.bytes_by_op.most_common(12)})


def weight_preparation(model: torch.nn.Module, x: torch.Tensor, amp: str) -> Dict:
    """Ops and bytes of one forward's stacking of the paths' parameters (every stage's ``_stage_weights``),
    without grad: what storing the parameters stacked would save an inference at most."""
    counter = OpCounter()
    with torch.no_grad(), _autocast(x.device, amp):
        dtype = _autocast_dtype(x)
        with counter:
            for stage in (m for m in model.modules() if isinstance(m, BatchedMHCAStage) and m.fast_ops):
                stage._stage_weights(dtype)
    return dict(weight_prep_ops=counter.kernels, weight_prep_mib=counter.bytes_written / 2 ** 20)


def measure(name: str, impl: str, args: argparse.Namespace, reference=None) -> List[Dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create(name, impl, args.features, reference)
    model = model.to(device)
    height, width = args.img_size if len(args.img_size) == 2 else args.img_size * 2
    x = torch.randn(args.batch_size, 3, height, width, device=device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    rows = []
    for mode in ('train', 'infer'):
        row = dict(model=name, impl=impl, mode=mode, batch_size=args.batch_size, img_size=[height, width],
                   amp=args.amp, features=args.features, device=str(device), torch=torch.__version__)
        row.update(count(model, x, mode, args.amp, args.features))
        if impl in FAST and mode == 'infer':
            row.update(weight_preparation(model, x, args.amp))
        rows.append(row)
    return rows


def add_ratios(rows: List[Dict]) -> None:
    """``vs_reference``: ours / reference for ops, kernels, bytes and saved bytes, and which targets are met."""
    reference = {(r['model'], r['mode']): r for r in rows if r['impl'] == 'reference'}
    for row in rows:
        ref = reference.get((row['model'], row['mode']))
        if row['impl'] == 'reference' or ref is None:
            continue
        ratios = {k: row[k] / ref[k] for k in ('ops', 'dispatched', 'mib_written', 'saved_mib') if row[k] is not None}
        row['vs_reference'] = ratios
        checks = {'infer_ops': ('infer', 'ops'), 'train_ops': ('train', 'ops'),
                  'train_written': ('train', 'mib_written'), 'train_saved': ('train', 'saved_mib')}
        row['targets'] = {target: ratios[key] <= TARGETS[target]
                          for target, (mode, key) in checks.items() if mode == row['mode'] and row['impl'] in FAST}


def render(rows: List[Dict]) -> str:
    header = ['model', 'impl', 'step', 'ops', 'dispatched', 'MiB written', 'saved MiB',
              'vs reference: ops / dispatched / written / saved', 'weight stacking: ops, MiB', 'targets']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for r in rows:
        ratios = r.get('vs_reference', {})
        ratio_cell = ' / '.join(f'{ratios[k]:.2f}x' for k in ('ops', 'dispatched', 'mib_written', 'saved_mib')
                                if k in ratios)
        targets = ', '.join(f"{k} <= {TARGETS[k]}x: {'met' if ok else 'NOT met'}" for k, ok in
                            r.get('targets', {}).items())
        saved = f"{r['saved_mib']:.1f}" if r['saved_mib'] is not None else ''
        prep = f"{r['weight_prep_ops']}, {r['weight_prep_mib']:.1f}" if 'weight_prep_ops' in r else ''
        lines.append(f"| {r['model']} | {r['impl']} | {r['mode']} | {r['ops']} | {r['dispatched']} | "
                     f"{r['mib_written']:.1f} | {saved} | {ratio_cell} | {prep} | {targets} |")
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['mpvit_small'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], help='S or H W')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='bf16')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--features', action='store_true', help='the features_only backbone (dense-task shapes)')
    parser.add_argument('--impl', choices=list(IMPLS), default='batched',
                        help="MPViT's formulations to count, as dev/benchmark.py's --impl (default: the paths "
                             "batched: the opt-in form, mpvit.set_batch_paths)")
    parser.add_argument('--reference-file', help="the authors' mpvit.py: count its variants in the same run")
    parser.add_argument('--top', action='store_true', help='also print the most frequent ops of each row')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the rows to this file')
    args = parser.parse_args(argv)
    if len(args.img_size) not in (1, 2):
        parser.error('--img-size takes one or two numbers')
    reference = load_reference(args.reference_file) if args.reference_file else None
    impls = IMPLS[args.impl]
    rows: List[Dict] = []
    for name in args.models:
        for impl in impls + (['reference'] if reference is not None and hasattr(reference, name) else []):
            rows += measure(name, impl, args, reference)
    add_ratios(rows)
    print(render(rows))
    if args.top:
        for r in rows:
            name = f"{r['model']} {r['impl']} {r['mode']}"
            print(f'{name} ops: ' + ', '.join(f'{k} {v}' for k, v in r['top_ops'].items()))
            print(f'{name} MiB written: ' + ', '.join(f'{k} {v:.0f}' for k, v in r['top_mib_written'].items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == '__main__':
    main()
