"""Coloured shapes as built-in demo data and test sets, in the real dataset formats.

    python -m mpvit.demo_data output/shapes --train-per-class 64 --val-per-class 16
    python -m mpvit.demo_data output/shapes_coco --coco --train-images 32 --val-images 8 [--num-classes 2]

ImageFolder: the class is the shape (disc, square, triangle, cross); colour,
size, position and background vary randomly, so a model has to look at form.
COCO: several shapes per image, each annotated with a box and a polygon
(``instances_{train,val}.json`` beside ``{train,val}/*.jpg``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

SHAPES = ('disc', 'square', 'triangle', 'cross')


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    colour = tuple(rng.randint(120, 255) for _ in range(3))
    img = Image.new('RGB', (size, size), background)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.35) * size
    cx, cy = (rng.uniform(r + 1, size - r - 1) for _ in range(2))
    if shape == 'disc':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'square':
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    return img


def write_shapes_imagefolder(
        root: str | Path,
        num_classes: int = 4,
        train_per_class: int = 64,
        val_per_class: int = 16,
        size: int = 64,
        seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<shape>/<n>.JPEG`` and return ``root``."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f'num_classes must be 1..{len(SHAPES)}')
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for shape in SHAPES[:num_classes]:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                _draw(shape, size, rng).save(folder / f'{shape}_{n:05d}.JPEG', quality=95)
    return root


def _polygon(shape: str, cx: float, cy: float, r: float) -> list:
    """Outline of a shape as [(x, y), ...]; a disc is a 24-gon."""
    if shape == 'disc':
        return [(cx + r * math.cos(2 * math.pi * i / 24), cy + r * math.sin(2 * math.pi * i / 24)) for i in range(24)]
    if shape == 'square':
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == 'triangle':
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    w = r / 3
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx + w, cy + w),
            (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def write_shapes_coco(
        root: str | Path,
        train_images: int = 32,
        val_images: int = 8,
        size: tuple = (160, 128),
        max_objects: int = 3,
        seed: int = 0,
        shapes: Sequence[str] = SHAPES,
) -> Path:
    """Write ``root/{train,val}/*.jpg`` and ``root/annotations/instances_{train,val}.json`` (COCO instances,
    polygon segmentations, category ids 1..len(shapes)) and return ``root``. ``size`` is (width, height);
    ``shapes``: the categories, a subset of :data:`SHAPES`."""
    root = Path(root)
    rng = random.Random(seed)
    width, height = size
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f'unknown shapes {unknown}; known: {SHAPES}')
    categories = [dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(shapes)]
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split, count in (('train', train_images), ('val', val_images)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            img = Image.new('RGB', (width, height), tuple(rng.randint(0, 90) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(rng.randint(1, max_objects)):
                category = rng.randrange(len(shapes))
                r = rng.uniform(0.12, 0.25) * min(width, height)
                cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
                points = _polygon(shapes[category], cx, cy, r)
                draw.polygon(points, fill=tuple(rng.randint(120, 255) for _ in range(3)))
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                area = 0.5 * abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(points))))
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=category + 1, iscrowd=0, area=area,
                    bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    segmentation=[[round(v, 2) for p in points for v in p]],
                ))
            file_name = f'{image_id:06d}.jpg'
            img.save(root / split / file_name, quality=95)
            images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
        with open(root / 'annotations' / f'instances_{split}.json', 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root')
    parser.add_argument('--coco', action='store_true', help='write a COCO instance-segmentation set instead')
    parser.add_argument('--train-images', type=int, default=32, help='COCO: training images')
    parser.add_argument('--val-images', type=int, default=8, help='COCO: validation images')
    parser.add_argument('--num-classes', type=int, default=4, help='shapes (classes / categories), 1..4')
    parser.add_argument('--train-per-class', type=int, default=64)
    parser.add_argument('--val-per-class', type=int, default=16)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.num_classes <= len(SHAPES):
        parser.error(f'--num-classes {args.num_classes}: must be 1..{len(SHAPES)} (the shapes: {", ".join(SHAPES)})')
    if args.coco:
        root = write_shapes_coco(args.root, args.train_images, args.val_images, seed=args.seed,
                                 shapes=SHAPES[:args.num_classes])
        print(f'wrote {root} ({args.num_classes} categories)')
        return
    root = write_shapes_imagefolder(args.root, args.num_classes, args.train_per_class, args.val_per_class,
                                    args.size, args.seed)
    print(f'wrote {root}')


if __name__ == '__main__':
    main()
