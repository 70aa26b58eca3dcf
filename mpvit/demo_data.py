"""A small ImageFolder of coloured shapes: built-in demo data and an easy-but-not-trivial test set.

    python -m mpvit.demo_data output/shapes --train-per-class 64 --val-per-class 16

The class is the shape (disc, square, triangle, cross); colour, size, position
and background vary randomly, so a model has to look at form, not colour.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root')
    parser.add_argument('--num-classes', type=int, default=4)
    parser.add_argument('--train-per-class', type=int, default=64)
    parser.add_argument('--val-per-class', type=int, default=16)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    root = write_shapes_imagefolder(args.root, args.num_classes, args.train_per_class, args.val_per_class,
                                    args.size, args.seed)
    print(f'wrote {root}')


if __name__ == '__main__':
    main()
