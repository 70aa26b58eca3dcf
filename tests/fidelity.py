"""The recipe behind the reference outputs in ``tests/data`` (synthetic weights, inputs, summaries).

A tensor's synthetic value depends only on its key and shape, so a checkpoint
written from a manifest holds the same weights the reference was run with.
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import numpy as np
import torch

DATA = Path(__file__).parent / 'data'


def golden(name: str) -> Dict:
    with open(DATA / name) as f:
        return json.load(f)


def synth_tensor(key: str, shape: Sequence[int]) -> torch.Tensor:
    if key.endswith('num_batches_tracked'):
        return torch.tensor(0, dtype=torch.int64)
    rs = np.random.RandomState(zlib.crc32(key.encode('utf-8')))
    shape = tuple(shape)
    if key.endswith('running_var'):
        value = rs.uniform(0.5, 1.5, shape)
    elif key.endswith('running_mean'):
        value = 0.1 * rs.standard_normal(shape)
    elif len(shape) == 1 and key.endswith('weight'):
        value = 1.0 + 0.1 * rs.standard_normal(shape)
    elif key.endswith('bias'):
        value = 0.02 * rs.standard_normal(shape)
    else:
        value = 0.7 * rs.standard_normal(shape) / math.sqrt(max(1, int(np.prod(shape[1:]))))
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


def synth_state_dict(shapes: Mapping[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    return {k: synth_tensor(k, s) for k, s in shapes.items()}


def synth_input(seed: int, batch: int, height: int, width: int) -> torch.Tensor:
    rs = np.random.RandomState(seed)
    return torch.from_numpy(rs.standard_normal((batch, 3, height, width)).astype(np.float32))


def _sample_indices(numel: int, count: int = 32, seed: int = 1234) -> List[int]:
    rs = np.random.RandomState(seed)
    return sorted(int(i) for i in rs.choice(numel, size=min(count, numel), replace=False))


def summarize(t: torch.Tensor) -> Dict:
    flat = t.detach().double().cpu().reshape(-1)
    idx = _sample_indices(flat.numel())
    return {
        'shape': list(t.shape),
        'mean': flat.mean().item(),
        'std': flat.std().item(),
        'abs_mean': flat.abs().mean().item(),
        'sample_index': idx,
        'sample_value': [flat[i].item() for i in idx],
    }


def compare(summary: Mapping, t: torch.Tensor, rtol: float = 1e-4, std_tol: float = 1e-4) -> List[str]:
    """Mismatches against a golden summary: |got - golden| <= rtol * |golden| + std_tol * std passes."""
    got = summarize(t)
    if got['shape'] != summary['shape']:
        return [f"shape {got['shape']} != golden {summary['shape']}"]
    atol = std_tol * summary['std']
    errors = []
    for name in ('mean', 'std', 'abs_mean'):
        if abs(got[name] - summary[name]) > atol + rtol * abs(summary[name]):
            errors.append(f"{name} {got[name]:.7g} != golden {summary[name]:.7g}")
    if got['sample_index'] != summary['sample_index']:
        return errors + ['sample indices differ from the golden file']
    for i, a, b in zip(got['sample_index'], got['sample_value'], summary['sample_value']):
        if abs(a - b) > atol + rtol * abs(b):
            errors.append(f'value at flat index {i}: {a:.7g} != golden {b:.7g}')
    return errors
