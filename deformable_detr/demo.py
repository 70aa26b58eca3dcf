"""Draw a Deformable DETR + MPViT detector's boxes, class names and scores on images.

    python deformable_detr/demo.py street.jpg more/*.jpg -c configs/deformable_detr/mpvit_small.yaml \\
        --weights output/deformable_detr/mpvit_small/checkpoint.pth --threshold 0.5 --output output/demo_detr
    python deformable_detr/demo.py street.jpg -c configs/deformable_detr/mpvit_small.yaml --weights released

Writes one PNG per image into ``--output`` and prints every detection (class, score, box in pixels) and
where each picture went. The images go through ``main.py``'s evaluation transform and post-processing
(the same functions), so a detection drawn here is one that evaluation scores; labels that are no
category (0, the gaps between COCO's ids) are left out, as COCOeval ignores them. Class names come from
the checkpoint (``dataset_meta``, written by ``main.py``); a checkpoint without them with COCO's 91
outputs (the released ones) gets COCO's names, any other ``class <id>``. The model (backbone, queries,
levels) and the input size are the checkpoint's own when it records them (``args`` / ``preprocess``),
else the config's.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import importlib.util
import os
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Dict, List, Mapping

import torch
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from mpvit import model_zoo
from mpvit.checkpoint import read_checkpoint, require_task_weights, unwrap_checkpoint
from mpvit.coco_checks import coco_2017_names
from mpvit.deformable_detr.checkpoint import head_classes, is_original_layout, load_detector_weights
from mpvit.deformable_detr.model import build_deformable_detr
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import decode_error, open_rgb
from mpvit.training import ensure_writable_dir, setup_logging, user_errors_in_one_line


def _driver() -> ModuleType:
    """This folder's ``main.py`` (its evaluation transform and post-processing), under a name of its own."""
    spec = importlib.util.spec_from_file_location('_deformable_detr_main', Path(__file__).with_name('main.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


driver = _driver()

# Settings a checkpoint written by main.py records (its ``args``) that decide the model and its input.
MODEL_KEYS = ('backbone', 'num_queries', 'num_feature_levels')
INPUT_KEYS = ('test_size', 'max_size')
COCO_CLASSES = 91
PALETTE = ['#e6194b', '#3cb44b', '#ffe119', '#4363d8', '#f58231', '#911eb4', '#46f0f0', '#f032e6', '#bcf60c',
           '#fabebe', '#008080', '#e6beff', '#9a6324', '#fffac8', '#800000', '#aaffc3']


def class_names(checkpoint: Mapping, num_classes: int | None) -> Dict[int, str]:
    """Category id -> name: the checkpoint's ``dataset_meta``; for one without it that has COCO's 91
    outputs (the released checkpoints, older ones of ours), COCO's 80 names; otherwise none."""
    meta = checkpoint.get('dataset_meta') if isinstance(checkpoint, Mapping) else None
    if isinstance(meta, Mapping) and 'classes' in meta and 'category_ids' in meta:
        return {int(i): str(n) for i, n in zip(meta['category_ids'], meta['classes'])}
    return coco_2017_names() if num_classes == COCO_CLASSES else {}


def settings(config: str, checkpoint: Mapping, device: str) -> SimpleNamespace:
    """The model and evaluation-input settings: the config's, overridden by those the checkpoint recorded."""
    args = vars(driver.get_args(['-c', config, '--device', device, '--pretrained', '']))
    saved = checkpoint.get('args') if isinstance(checkpoint, Mapping) else None
    if isinstance(saved, Mapping):
        args.update({k: saved[k] for k in MODEL_KEYS + INPUT_KEYS if k in saved})
    preprocess = checkpoint.get('preprocess') if isinstance(checkpoint, Mapping) else None
    if isinstance(preprocess, Mapping):
        args.update({k: preprocess[k] for k in INPUT_KEYS if k in preprocess})
    args['amp'] = 'none'
    return SimpleNamespace(**args)


def check_inputs(images: List[str], threshold: float, config: str) -> None:
    """Refuse, before any model is built, what would stop the run half-way."""
    if not 0.0 <= threshold <= 1.0:
        raise InvalidInputError(f'--threshold {threshold}: must be in [0, 1] (a score)')
    if not os.path.isfile(config):
        raise MissingFileError(f'config file not found: {config}')
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f'image(s) not found: {", ".join(missing)}')
    for path in images:
        error = decode_error(path)
        if error is not None:
            raise InvalidInputError(f'unreadable image {path} ({" ".join(str(error).split()) or type(error).__name__})')


def output_name(path: str, taken: set) -> str:
    """``<stem>.png``, numbered when two inputs share a stem."""
    stem, n = Path(path).stem, 1
    name = f'{stem}.png'
    while name in taken:
        n += 1
        name = f'{stem}_{n}.png'
    taken.add(name)
    return name


def main(argv: List[str] | None = None) -> List[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument('--weights', required=True,
                        help="a Deformable DETR checkpoint (ours or the original layout), file or URL; 'released': "
                             "the authors' checkpoint of the config")
    parser.add_argument('-c', '--config', required=True, help='configs/deformable_detr/*.yaml')
    parser.add_argument('--threshold', type=float, default=0.5, help='smallest score drawn, in [0, 1]')
    parser.add_argument('--output', default='output/deformable_detr/demo', help='folder for the PNGs')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    setup_logging('mpvit.deformable_detr')  # the driver's progress lines (driver.log) are shown
    check_inputs(args.images, args.threshold, args.config)
    output = ensure_writable_dir(args.output)

    backbone = driver.get_args(['-c', args.config, '--pretrained', '']).backbone
    weights = model_zoo.resolve(args.weights, config=args.config, model='deformable_detr_' + backbone)
    checkpoint = read_checkpoint(weights)
    state = unwrap_checkpoint(checkpoint)
    if not is_original_layout(state):
        require_task_weights(state, 'class_embed.', weights, 'Deformable DETR')
    cfg = settings(args.config, checkpoint, args.device)
    num_classes = head_classes(checkpoint)
    names = class_names(checkpoint, num_classes)

    driver.log(f'building Deformable DETR + {cfg.backbone} ({num_classes} class outputs) from {weights}')
    model = build_deformable_detr(cfg.backbone, num_classes, cfg.num_queries, cfg.num_feature_levels)
    load_detector_weights(model, weights, checkpoint=checkpoint)
    device = torch.device(args.device)
    model.to(device).eval()
    transform = driver.build_transforms(False, cfg)

    written, taken = [], set()
    for path in args.images:
        image = F.to_image(open_rgb(path))
        height, width = image.shape[-2:]
        batch = driver.collate([(transform(image), dict(orig_size=(height, width)))])
        detections = driver.detect(model, batch, device, cfg)[0]
        keep = detections['scores'] >= args.threshold
        if names:  # ids that are no category (0, COCO's gaps) were never trained as one: as COCOeval, skip them
            keep &= torch.tensor([int(label) in names for label in detections['labels']], device=keep.device)
        scores, labels = detections['scores'][keep].cpu(), detections['labels'][keep].cpu()
        boxes = detections['boxes'][keep].cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        captions = [f'{names.get(int(label), f"class {int(label)}")} {float(score):.2f}'
                    for label, score in zip(labels, scores)]
        print(f'{path}: {len(captions)} detections with score >= {args.threshold}')
        for caption, (x0, y0, x1, y1) in zip(captions, boxes.tolist()):
            print(f'  {caption}  [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]')
        drawn = draw_bounding_boxes(image.as_subclass(torch.Tensor), boxes, labels=captions, width=2,
                                    colors=[PALETTE[int(label) % len(PALETTE)] for label in labels])
        target = output / output_name(path, taken)
        F.to_pil_image(drawn).save(target)
        print(f'wrote {target}', flush=True)
        written.append(target)
    return written


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
