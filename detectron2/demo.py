"""Draw an MPViT detector's predictions (boxes, masks, class names, scores) on images with Detectron2's
Visualizer.

    python detectron2/demo.py --config-file configs/detectron2/mask_rcnn_mpvit_small_ms_3x.yaml \\
        --input street.jpg more/*.jpg --output output/demo_d2 MODEL.WEIGHTS released
    python detectron2/demo.py --config-file configs/detectron2/mask_rcnn_mpvit_tiny_1x.yaml \\
        --input mine.jpg --output out/ --confidence-threshold 0.3 MODEL.WEIGHTS output/mine/model_final.pth

Writes one PNG per input image into ``--output`` and prints each detection. ``MODEL.WEIGHTS released`` is the
authors' checkpoint of the config. The class names (and their number) come from the checkpoint when
``detectron2/train_net.py`` wrote it (``dataset_meta``), else from the config's first test dataset
(``--coco-dataset`` registers one; COCO's by default).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os
import re
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from mpvit import model_zoo
from mpvit.checkpoint import local_checkpoint, read_checkpoint
from mpvit.coco_checks import coco_2017_names
from mpvit.d2 import add_mpvit_config, load_detector_weights, merge_user_config, register_coco_datasets
from mpvit.d2.classes import (
    checkpoint_classes,
    dataset_classes,
    follow_dataset_classes,
    mark_num_classes_unset,
    num_classes,
)
from mpvit.errors import InvalidInputError, MissingFileError
from mpvit.images import is_high_depth, open_rgb, unreadable_error
from mpvit.training import user_errors_in_one_line

DEMO_DATASET = '__mpvit_demo'  # the metadata the Visualizer names classes with


class Predictor(DefaultPredictor):
    """DefaultPredictor whose weights go through ``load_detector_weights`` (every released format, clear errors,
    heads that must fit: a head left random would draw meaningless boxes)."""

    def __init__(self, cfg: CfgNode):
        weights, cfg = cfg.MODEL.WEIGHTS, cfg.clone()
        cfg.defrost()
        cfg.MODEL.WEIGHTS = ''
        super().__init__(cfg)
        if weights:
            load_detector_weights(self.model, weights, head='require')


def setup(args: argparse.Namespace) -> tuple[CfgNode, list[str]]:
    """The config (class count from the checkpoint or the test dataset unless set) and the class names."""
    cfg = get_cfg()
    add_mpvit_config(cfg)
    mark_num_classes_unset(cfg)
    merge_user_config(cfg, args.config_file, args.opts)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = 'cpu'
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    register_coco_datasets(args.coco_dataset)
    names = None
    if cfg.MODEL.WEIGHTS:  # found / downloaded and checked (no code in it) before the model is built
        cfg.MODEL.WEIGHTS = local_checkpoint(model_zoo.resolve(cfg.MODEL.WEIGHTS, args.config_file))
        names = checkpoint_classes(read_checkpoint(cfg.MODEL.WEIGHTS))
    tested = [name for name in cfg.DATASETS.TEST[:1] if dataset_classes(name) is not None]
    follow_dataset_classes(cfg, [] if names else tested, user_classes=len(names) if names else None)
    if names is None:
        names = dataset_classes(tested[0]) if tested else None
    count = num_classes(cfg)
    coco = coco_2017_names()
    if names is None and count == len(coco):  # the released detectors store no names
        names = [coco[i] for i in sorted(coco)]
    if names is None or len(names) != count:
        names = [f'class {i}' for i in range(count)]
    cfg.freeze()
    return cfg, names


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
    parser.add_argument('--confidence-threshold', type=float, default=0.5,
                        help='draw detections scoring at least this (0..1; lower it for a briefly trained model)')
    parser.add_argument('--coco-dataset', nargs=3, action='append', metavar=('NAME', 'JSON', 'IMAGE_DIR'),
                        help='register a COCO-format dataset, for the class names of DATASETS.TEST')
    parser.add_argument('opts', nargs=argparse.REMAINDER, help='config overrides, KEY VALUE pairs')
    args = parser.parse_args(argv)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise InvalidInputError(f'--confidence-threshold {args.confidence_threshold}: must be in [0, 1]')
    missing = [p for p in args.input if not os.path.isfile(p)]
    if missing:
        keys = [p for p in missing if re.fullmatch(r'[A-Z_]+(\.[A-Z0-9_]+)+', p)]
        hint = (f' ({keys[0]} is a config key: put KEY VALUE pairs after --output, not after --input\'s images)'
                if keys else '')
        raise MissingFileError(f'input image(s) not found: {", ".join(missing)}{hint}')
    cfg, names = setup(args)
    predictor = Predictor(cfg)
    if DEMO_DATASET in MetadataCatalog.list():  # main() called again in one process (tests)
        MetadataCatalog.remove(DEMO_DATASET)
    metadata = MetadataCatalog.get(DEMO_DATASET).set(thing_classes=names)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for path in args.input:
        image = load_bgr(path)
        instances = predictor(image)['instances'].to('cpu')
        visualizer = Visualizer(image[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
        drawn = visualizer.draw_instance_predictions(instances)
        out = Path(args.output) / (Path(path).stem + '.png')
        drawn.save(str(out))
        print(f'{path}: {len(instances)} detections scoring >= {args.confidence_threshold:g}')
        for box, score, label in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                     instances.pred_classes.tolist()):
            print(f"  {names[label]:<20} {score:.3f}  box {' '.join(f'{v:.1f}' for v in box)}")
        if not len(instances):
            print('  (nothing to draw at this threshold: try a lower --confidence-threshold)')
        print(f'  wrote {out.resolve()}')
        written.append(out)
    return written


if __name__ == '__main__':
    setup_logger(name='mpvit')  # here, not in main(): it stops the logger's propagation, process-wide
    with user_errors_in_one_line():
        main()
