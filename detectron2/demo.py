"""Draw an MPViT detector's predictions (boxes, masks) on images with Detectron2's Visualizer.

    python detectron2/demo.py --config-file configs/detectron2/mask_rcnn_mpvit_small_ms_3x.yaml \\
        --input street.jpg more/*.jpg --output output/demo_d2 MODEL.WEIGHTS mask_rcnn_mpvit_small_ms_3x.pth

Writes one PNG per input image into ``--output``. Class names come from the
config's first test dataset (COCO's by default).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from mpvit.checkpoint import local_checkpoint
from mpvit.d2 import MPViTCheckpointer, add_mpvit_config, merge_user_config, register_coco_datasets
from mpvit.errors import MissingFileError
from mpvit.images import is_high_depth, open_rgb, unreadable_error
from mpvit.training import user_errors_in_one_line


class Predictor(DefaultPredictor):
    """DefaultPredictor whose weights go through MPViTCheckpointer (every released format, clear errors)."""

    def __init__(self, cfg: CfgNode):
        weights, cfg = cfg.MODEL.WEIGHTS, cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ''
        super().__init__(cfg)
        if weights:
            MPViTCheckpointer(self.model).load(weights)


def setup(args: argparse.Namespace) -> CfgNode:
    cfg = get_cfg()
    add_mpvit_config(cfg)
    merge_user_config(cfg, args.config_file, args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    return cfg


def load_bgr(path: str) -> np.ndarray:
    """The image as DefaultPredictor takes it (BGR; it converts to INPUT.FORMAT): Detectron2's reader (EXIF
    orientation applied), but a 16-bit grey image scaled to 8 bits instead of clipped white."""
    try:
        return np.asarray(open_rgb(path))[:, :, ::-1] if is_high_depth(path) else read_image(path, format='BGR')
    except OSError as e:
        raise unreadable_error(path, e) from None


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config-file', required=True)
    parser.add_argument('--input', nargs='+', required=True, help='image files')
    parser.add_argument('--output', required=True, help='folder for the PNGs')
    parser.add_argument('--confidence-threshold', type=float, default=0.5)
    parser.add_argument('--coco-dataset', nargs=3, action='append', metavar=('NAME', 'JSON', 'IMAGE_DIR'),
                        help='register a COCO-format dataset, for the class names of DATASETS.TEST')
    parser.add_argument('opts', nargs=argparse.REMAINDER, help='config overrides, KEY VALUE pairs')
    args = parser.parse_args(argv)
    setup_logger(name='mpvit')
    cfg = setup(args)
    register_coco_datasets(args.coco_dataset)
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        raise MissingFileError(f'input image(s) not found: {", ".join(missing)}')
    if cfg.MODEL.WEIGHTS:  # found / downloaded and checked (no code in it) before the model is built
        cfg.defrost()
        cfg.MODEL.WEIGHTS = local_checkpoint(cfg.MODEL.WEIGHTS)
        cfg.freeze()
    predictor = Predictor(cfg)
    name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else '__unused'
    if name in DatasetCatalog.list() and not MetadataCatalog.get(name).get('thing_classes'):
        DatasetCatalog.get(name)  # loading a registered COCO json fills in its class names
    metadata = MetadataCatalog.get(name)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in args.input:
        image = load_bgr(path)
        instances = predictor(image)['instances'].to('cpu')
        visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawn = visualizer.draw_instance_predictions(instances)
        out = Path(args.output) / (Path(path).stem + '.png')
        drawn.save(str(out))
        print(f'{path}: {len(instances)} instances -> {out}')
        written.append(out)
    return written


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
