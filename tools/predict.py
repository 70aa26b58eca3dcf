"""Classify images with any classification checkpoint of MPViT; prints the top classes with their names.

    python tools/predict.py image.jpg [more.jpg ...] [--weights FILE | URL | released] [--model mpvit_small]

``--weights released`` (the default) is the authors' ImageNet checkpoint of ``--model`` (default
``mpvit_small``), named with ImageNet's classes. A checkpoint written by ``classification/main.py`` (your own
classes, e.g. after fine-tuning) carries its variant, class names, input size and normalisation in a
``pretrained_cfg`` entry (timm's form): the model, the transform and the names come from it. Other
checkpoints are read with their classifier's class count, named ``class <i>`` unless that is ImageNet's 1000.
The images go through the model's evaluation transform (resize, centre crop, normalise), as timm's tools do.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
from typing import Dict, List, Optional, Sequence

import timm
import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import mpvit  # noqa: F401  (registers the models)
from mpvit import model_zoo
from mpvit.checkpoint import CheckpointError, checkpoint_tensors, load_backbone_weights, read_checkpoint
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import open_rgb
from mpvit.training import user_errors_in_one_line

DEFAULT_MODEL = 'mpvit_small'
HEAD_WEIGHT = 'cls_head.cls.weight'


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--model', default=None,
                        help=f"mpvit_tiny | mpvit_xsmall | mpvit_small | mpvit_base (default: the checkpoint's "
                             f'variant, else {DEFAULT_MODEL})')
    parser.add_argument('--weights', default=model_zoo.RELEASED,
                        help="checkpoint file or URL, 'released', or zoo:<name> (mpvit/model_zoo.json)")
    parser.add_argument('--top', type=int, default=5)
    args = parser.parse_args(argv)
    if args.model is not None and not timm.is_model(args.model):
        parser.error(f"--model {args.model}: unknown model; MPViT variants: {', '.join(timm.list_models('mpvit_*'))}")
    if args.top < 1:
        parser.error(f'--top {args.top}: must be at least 1')
    return args


def class_names(checkpoint, num_classes: int) -> tuple[Optional[Dict], List[str]]:
    """The checkpoint's ``pretrained_cfg`` (if it has one) and the names of its ``num_classes`` classes."""
    cfg = checkpoint.get('pretrained_cfg') if isinstance(checkpoint, dict) else None
    if isinstance(cfg, dict) and cfg.get('label_names') is not None:
        return cfg, list(cfg['label_names'])
    if num_classes == ImageNetInfo().num_classes():
        info = ImageNetInfo()
        return None, [f'{info.index_to_description(i)} ({info.index_to_label_name(i)})' for i in range(num_classes)]
    return None, [f'class {i}' for i in range(num_classes)]


def load_classifier(weights: str, model_name: Optional[str]) -> tuple[torch.nn.Module, List[str], Dict]:
    """The model of a classification checkpoint, its class names and its data config (transform)."""
    checkpoint = read_checkpoint(weights)
    heads = [v for k, v in checkpoint_tensors(checkpoint, weights).items() if k.endswith(HEAD_WEIGHT)]
    if not heads:
        raise CheckpointError(f'{weights} has no classifier ({HEAD_WEIGHT}): a backbone-only or dense-task '
                              'checkpoint cannot classify; fine-tune one with classification/main.py --pretrained')
    cfg, names = class_names(checkpoint, heads[0].shape[0])
    if len(names) != heads[0].shape[0]:
        raise CheckpointError(f'{weights}: {len(names)} class names for a classifier of {heads[0].shape[0]} classes')
    saved_args = checkpoint.get('args') if isinstance(checkpoint, dict) else None  # older checkpoints of ours
    model_name = (model_name or (cfg or {}).get('architecture')
                  or (saved_args.get('model') if isinstance(saved_args, dict) else None) or DEFAULT_MODEL)
    if not timm.is_model(model_name):
        raise CheckpointError(f'{weights}: unknown model {model_name!r}; MPViT variants: '
                              f"{', '.join(timm.list_models('mpvit_*'))} (--model)")
    model = timm.create_model(model_name, num_classes=len(names)).eval()
    load_backbone_weights(model, weights, checkpoint=checkpoint, head='require')
    data_config = resolve_data_config(pretrained_cfg=cfg or model.pretrained_cfg)
    return model, names, data_config


@torch.no_grad()
def predict(args: argparse.Namespace) -> List[List[Dict]]:
    """Per image, the ``--top`` classes as ``{'index', 'name', 'probability'}``, best first."""
    weights = model_zoo.resolve(args.weights, model=args.model or DEFAULT_MODEL)
    model, names, data_config = load_classifier(weights, args.model)
    transform = create_transform(**data_config)
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
        results.append([dict(index=i, name=names[i], probability=p)
                        for p, i in zip(top.values.tolist(), top.indices.tolist())])
    return results


def main(argv: Sequence[str] | None = None) -> List[List[Dict]]:
    args = parse_args(argv)
    results = predict(args)
    for path, top in zip(args.images, results):
        print(path)
        for rank, entry in enumerate(top, 1):
            print(f"  {rank}. {entry['probability']:6.2%}  {entry['name']} ({entry['index']})")
    return results


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
