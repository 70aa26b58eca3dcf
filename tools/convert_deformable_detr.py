"""Convert a released Deformable DETR + MPViT checkpoint (original repository's layout) to ours.

    python tools/convert_deformable_detr.py deformable_detr_mpvit_small.pth converted.pth

``deformable_detr/main.py --resume`` converts on the fly, so this is only needed to
store the converted file. Fails, listing them, on keys it cannot place. The rules live in
:mod:`mpvit.deformable_detr.checkpoint`.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse

from mpvit.checkpoint import CheckpointError, check_usable, read_checkpoint, unwrap_checkpoint
from mpvit.deformable_detr.checkpoint import convert_original_state_dict, is_original_layout
from mpvit.training import save_atomic, user_errors_in_one_line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='original-layout checkpoint, file or URL')
    parser.add_argument('dst', help='output file')
    args = parser.parse_args(argv)
    state = unwrap_checkpoint(read_checkpoint(args.src))
    if not is_original_layout(state):
        raise CheckpointError(f'{args.src} is not in the original Deformable DETR layout (no transformer.* keys)')
    converted = convert_original_state_dict(state)
    check_usable(converted, None, args.src)  # no file is written from weights no model could use
    save_atomic({'model': converted}, args.dst)
    print(f'{len(state)} tensors -> {len(converted)} tensors: {args.dst}')


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
