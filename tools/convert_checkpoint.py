"""Re-save a checkpoint's weights as safetensors: the format every loader here reads without any risk.

    python tools/convert_checkpoint.py mpvit_small.pth mpvit_small.safetensors
    python tools/convert_checkpoint.py --drop-objects old_training_run.pth weights.safetensors

Every loader of this repository refuses a pickle that asks to build objects outside
a small allowlist of data types, because unpickling them could run code. For such a
file, ``--drop-objects`` reads it still without running anything of it: each object of
another type is replaced by an inert stand-in (and named), the tensors come back. The
weights (the ``model`` / ``state_dict`` entry, or the whole dict) are written as
safetensors, keeping their keys: the result loads wherever the
original did (``MODEL.WEIGHTS``, ``--resume`` for evaluation, ``init_cfg``, timm's
``pretrained_cfg_overlay``), and into the weights directory under the released name
(``mpvit_small.safetensors``) it serves ``released`` too. Optimizer and other
training state is not kept: it cannot be resumed from.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os
from typing import Sequence

from mpvit.checkpoint import check_usable, checkpoint_tensors, local_checkpoint
from mpvit.serialization import check_container, load_dropping_objects, safe_load, save_safetensors
from mpvit.training import ensure_writable_dir, user_errors_in_one_line
from mpvit.weights import fetch, file_sha256


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='checkpoint: file, URL or released name on the Hub (hf-hub:org/name/file)')
    parser.add_argument('dst', help='output .safetensors file')
    parser.add_argument('--drop-objects', action='store_true',
                        help='read SRC with inert stand-ins for objects of types outside the allowlist (nothing of '
                             'the file runs); their data is left out')
    args = parser.parse_args(argv)
    if not args.dst.endswith('.safetensors'):
        parser.error(f'{args.dst}: the output name must end in .safetensors (loaders choose the format by the name)')
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if args.drop_objects:
        path = fetch(args.src)
        check_container(path)  # missing, truncated or damaged (CRC) files are refused first
        checkpoint, dropped = load_dropping_objects(path)
        if dropped:
            print(f'{path}: left out objects of {len(dropped)} types: {", ".join(dropped)}')
    else:
        path = local_checkpoint(args.src)
        checkpoint = safe_load(path)
    tensors = checkpoint_tensors(checkpoint, args.src)
    check_usable(tensors, None, path)  # no file is written from weights no model could use
    ensure_writable_dir(os.path.dirname(os.path.abspath(args.dst)), 'output folder')
    save_safetensors(tensors, args.dst, metadata={'format': 'pt', 'source': os.path.basename(path),
                                                  'source_sha256': file_sha256(path)})
    print(f'{path} (sha256 {file_sha256(path)}): {len(tensors)} tensors -> {args.dst} '
          f'(sha256 {file_sha256(args.dst)})')
    return args.dst


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
