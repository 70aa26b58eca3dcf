"""Time ``python -m mpvit.check_data coco`` on a synthetic file of COCO 2017 train's size.

    python dev/benchmark_check_data.py /tmp/coco_size      # writes the set once (~2 min), then times the check

118,287 images and 860,001 annotations (12-point polygons, 80 categories), as COCO 2017 train; the images
are hard links to three real JPEGs of COCO's common sizes (no disk space), so the check opens 118k files
and reads their headers as it would on the real set. The timing is with the files in the page cache.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from PIL import Image

from mpvit.check_data import Report, check_coco, check_image_files, read_coco_file

SIZES = ((640, 480), (480, 640), (640, 427))


def write_coco_sized(root: Path, images: int, annotations: int, seed: int = 0) -> Path:
    """``root/annotations/instances_train2017.json`` and ``root/train2017/`` (hard links); returns the json."""
    (root / 'train2017').mkdir(parents=True, exist_ok=True)
    (root / 'annotations').mkdir(exist_ok=True)
    for width, height in SIZES:
        Image.new('RGB', (width, height), (90, 120, 150)).save(root / f'base_{width}x{height}.jpg', quality=50)
    rng = random.Random(seed)
    entries = []
    for image_id in range(1, images + 1):
        width, height = SIZES[image_id % len(SIZES)]
        name = f'{image_id:012d}.jpg'
        if not (root / 'train2017' / name).exists():
            os.link(root / f'base_{width}x{height}.jpg', root / 'train2017' / name)
        entries.append(dict(id=image_id, file_name=name, width=width, height=height))
    objects = []
    for ann_id in range(1, annotations + 1):
        image = entries[rng.randrange(images)]
        x, y = rng.uniform(0, image['width'] - 60), rng.uniform(0, image['height'] - 60)
        w, h = rng.uniform(2, 60), rng.uniform(2, 60)
        polygon = [round(v, 2) for k in range(12) for v in (x + w * (k % 4) / 3, y + h * (k // 4) / 2)]
        objects.append(dict(id=ann_id, image_id=image['id'], category_id=1 + ann_id % 80, iscrowd=0, area=w * h,
                            bbox=[round(x, 2), round(y, 2), round(w, 2), round(h, 2)], segmentation=[polygon]))
    path = root / 'annotations' / 'instances_train2017.json'
    categories = [dict(id=i, name=f'class{i}') for i in range(1, 81)]
    path.write_text(json.dumps(dict(images=entries, annotations=objects, categories=categories)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('root', type=Path)
    parser.add_argument('--images', type=int, default=118_287)
    parser.add_argument('--annotations', type=int, default=860_001)
    args = parser.parse_args()
    path = args.root / 'annotations' / 'instances_train2017.json'
    if not path.is_file():
        write_coco_sized(args.root, args.images, args.annotations)
    start = time.perf_counter()
    dataset = read_coco_file(str(path))
    parsed = time.perf_counter()
    report = check_coco(dataset, str(path), str(args.root / 'train2017'), check_files=False)
    entries = time.perf_counter()
    files = Report(str(path))
    check_image_files(files, dataset['images'], str(args.root / 'train2017'), exif_transpose=True)
    headers = time.perf_counter()
    count = len(dataset['images'])
    print(f'{count} images, {len(dataset["annotations"])} annotations: json.load {parsed - start:.1f} s, '
          f'entries {entries - parsed:.1f} s, headers {headers - entries:.1f} s ({count / (headers - entries):,.0f} '
          f'images/s); total {headers - start:.1f} s ({count / (headers - start):,.0f} images/s); '
          f'{len(report.errors) + len(files.errors)} kinds of error')


if __name__ == '__main__':
    main()
