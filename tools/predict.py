"""Classify images with an MPViT ImageNet checkpoint; prints the top-5 classes with their names.

    python tools/predict.py image.jpg [more.jpg ...] --model mpvit_small [--weights FILE | URL | released]

The images go through the model's own ``pretrained_cfg`` evaluation transform
(resize 256, centre crop 224, bicubic, ImageNet mean / std), as timm's tools do.
``--weights released`` (the default) is the authors' checkpoint of ``--model``.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Sequence

import timm
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from mpvit import model_zoo
from mpvit.checkpoint import load_backbone_weights
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import open_rgb
from mpvit.training import user_errors_in_one_line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--model', default='mpvit_small', help='mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base')
    parser.add_argument('--weights', default=model_zoo.RELEASED, help="checkpoint file or URL, or 'released'")
    parser.add_argument('--top', type=int, default=5)
    args = parser.parse_args(argv)
    if not timm.is_model(args.model):
        parser.error(f"--model {args.model}: unknown model; MPViT variants: {', '.join(timm.list_models('mpvit_*'))}")
    return args


@torch.no_grad()
def predict(args: argparse.Namespace) -> List[List[Dict]]:
    """Per image, the ``--top`` classes as ``{'index', 'label', 'name', 'probability'}``, best first."""
    info = ImageNetInfo()
    model = timm.create_model(args.model, num_classes=info.num_classes()).eval()
    load_backbone_weights(model, model_zoo.resolve(args.weights, model=args.model), head='require')
    transform = create_transform(**resolve_data_config(model=model))
    results = []
    for path in args.images:
        try:
            image = open_rgb(path)  # 16-bit grey scaled to 8 bits, not clipped white
        except FileNotFoundError:
            raise MissingFileError(f'{path}: no such image file') from None
        except OSError as e:  # not an image, truncated
            raise InvalidInputError(f'{path}: not a readable image ({" ".join(str(e).split())})') from None
        probabilities = model(transform(image).unsqueeze(0)).softmax(dim=-1)[0]
        top = probabilities.topk(min(args.top, probabilities.numel()))
        results.append([dict(index=i, label=info.index_to_label_name(i), name=info.index_to_description(i),
                             probability=p) for p, i in zip(top.values.tolist(), top.indices.tolist())])
    return results


def main(argv: Sequence[str] | None = None) -> List[List[Dict]]:
    args = parse_args(argv)
    results = predict(args)
    for path, top in zip(args.images, results):
        print(path)
        for rank, entry in enumerate(top, 1):
            print(f"  {rank}. {entry['probability']:6.2%}  {entry['name']} ({entry['label']}, {entry['index']})")
    return results


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
