"""Segment one image with a trained UperNet-MPViT and write the colour overlay as a PNG.

    python semantic_segmentation/demo.py IMAGE CONFIG CHECKPOINT --out overlay.png [--device cuda:0]
"""
from __future__ import annotations

import argparse

from mmseg.apis import inference_model, init_model, show_result_pyplot


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out', default='overlay.png')
    parser.add_argument('--opacity', type=float, default=0.5)
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    model = init_model(args.config, args.checkpoint, device=args.device)
    result = inference_model(model, args.image)
    show_result_pyplot(model, args.image, result, opacity=args.opacity, show=False, out_file=args.out)
    print(f'wrote {args.out}')
    return args.out


if __name__ == '__main__':
    main()
