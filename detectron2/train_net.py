"""Train and evaluate MPViT detectors (RetinaNet, Mask R-CNN, Cascade Mask R-CNN) with Detectron2.

Train on 8 GPUs:    python detectron2/train_net.py --config-file configs/detectron2/mask_rcnn_mpvit_small_1x.yaml \\
                        --num-gpus 8
Resume after a stop: add --resume (continues from OUTPUT_DIR/last_checkpoint)
Evaluate weights:   python detectron2/train_net.py --config-file ... --eval-only MODEL.WEIGHTS <file or URL>
The authors' model: python detectron2/train_net.py --config-file ... --eval-only MODEL.WEIGHTS released
Own COCO-format data: --coco-dataset NAME ANNOTATIONS.json IMAGE_DIR (repeatable), then
                      DATASETS.TRAIN "('NAME',)" DATASETS.TEST "('NAME',)"; the heads' class count follows
                      the data's categories unless NUM_CLASSES is set (then they must agree)

COCO itself is read from ``$DETECTRON2_DATASETS/coco`` (default ``./datasets/coco``), Detectron2's layout.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import logging
import os
import sys
import weakref

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, default_writers, hooks, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.layers import deform_conv
from detectron2.utils import comm

from mpvit import eval_results, model_zoo
from mpvit.check_data import fill_missing_areas
from mpvit.checkpoint import is_url, local_checkpoint
from mpvit.coco_checks import check_coco_instances, is_coco_2017
from mpvit.d2 import (
    MPViTCheckpointer,
    SkipUnreadable,
    add_mpvit_config,
    build_optimizer,
    build_train_loader,
    merge_user_config,
    register_coco_datasets,
)
from mpvit.d2.classes import (
    dataset_classes,
    dataset_meta,
    follow_dataset_classes,
    mark_num_classes_unset,
    read_coco_json,
)
from mpvit.errors import DivergenceError, InvalidInputError, MissingFileError, UnknownNameError
from mpvit.images import check_some_readable
from mpvit.training import LossWatch, align_gradient_strides, ensure_writable_dir, user_errors_in_one_line

logger = logging.getLogger('detectron2')


def _not_divergence(record: logging.LogRecord) -> bool:
    """Detectron2 logs a traceback for any exception ending training; a divergence is reported in one line."""
    return not (record.exc_info and isinstance(record.exc_info[1], DivergenceError))


logging.getLogger('detectron2.engine.train_loop').addFilter(_not_divergence)
# The patched PyPI build of Detectron2 has no C++ ops; pycocotools' evaluator is the official one anyway.
HAS_D2_C_OPS = deform_conv._C is not None


class Trainer(DefaultTrainer):
    """DefaultTrainer with the reference's optimizer, DETR-style augmentation and checkpoint formats."""

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        # DefaultTrainer wraps it in DDP when distributed: gradients laid out as DDP's buckets expect.
        return align_gradient_strides(model) if comm.get_world_size() > 1 else model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=SkipUnreadable(DatasetMapper(cfg, is_train=False), is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, 'inference', dataset_name)
        evaluator = COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=HAS_D2_C_OPS)
        # COCO evaluation sorts objects by area: the ground truth it read gets pycocotools' own where the file
        # has none (check_datasets counted them), instead of a KeyError after the whole inference.
        fill_missing_areas(evaluator._coco_api.dataset)  # its index holds the same annotation dicts
        return evaluator

    def run_step(self) -> None:
        try:
            super().run_step()
        except FloatingPointError as e:  # Detectron2 checks the loss before the optimizer step: nothing applied
            if 'Loss became infinite or NaN' not in str(e):
                raise
            raise DivergenceError(self._divergence_message(e)) from None

    def _divergence_message(self, err: FloatingPointError) -> str:
        watch = LossWatch()
        try:
            watch.last_finite, last_iter = self.storage.history('total_loss').values()[-1]
            watch.last_where = f'iteration {last_iter}'
        except KeyError:  # no step logged yet
            pass
        losses = str(err).partition('loss_dict = ')[2].replace('\n', ' ').strip()
        return watch.message(f'the loss is not finite ({losses or err})', f'iteration {self.iter}')

    def build_hooks(self):
        # DefaultTrainer made a plain DetectionCheckpointer just before this call; the hooks (periodic
        # checkpointing) and resume_or_load must use ours, which reads every released format and saves the
        # training set's class names with the weights.
        self.checkpointer = MPViTCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
            dataset_meta=dataset_meta(self.cfg.DATASETS.TRAIN[0]) if self.cfg.DATASETS.TRAIN else None)
        # DefaultTrainer keeps the last evaluation in a private attribute; ours is public: ``eval_results``.
        hooks_ = [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self.evaluate) if isinstance(hook, hooks.EvalHook)
                  else hook for hook in super().build_hooks()]
        if comm.is_main_process():  # after the evaluation hook, as DefaultTrainer places its own writer
            hooks_.append(hooks.PeriodicWriter(default_writers(self.cfg.OUTPUT_DIR, self.max_iter),
                                               period=log_period(self.max_iter)))
        return hooks_

    def evaluate(self) -> dict:
        """Evaluate the model on cfg.DATASETS.TEST (the evaluation hook's function), kept in ``eval_results``."""
        self.eval_results = self.test(self.cfg, self.model)
        return self.eval_results

    def resume_or_load(self, resume: bool = True) -> None:
        # Resuming continues the saved heads: heads for other classes (the data changed since) are refused in
        # one line, where fine-tuning from MODEL.WEIGHTS replaces them.
        self.checkpointer.heads_must_fit = resume and self.checkpointer.has_checkpoint()
        try:
            super().resume_or_load(resume=resume)
        finally:
            self.checkpointer.heads_must_fit = False

    def build_writers(self):
        # DefaultTrainer's writer hook logs every 20 iterations: silent for minutes in a short run on a CPU.
        # It gets no writers; the hook added in build_hooks logs at log_period.
        return []


def log_period(max_iter: int) -> int:
    """Detectron2's 20 iterations, or fewer for a short run, so that it logs about 10 times at least."""
    return max(1, min(20, max_iter // 10))


def check_datasets(cfg: CfgNode, eval_only: bool = False) -> None:
    """Fail before any model is built, naming the file, when a COCO-format dataset is missing or fails
    ``python -m mpvit.check_data coco``'s checks (a test set must have annotations to score; training masks,
    annotations Detectron2 can turn into masks). Evaluation needs no training set. (The class count is
    checked against the data by ``follow_dataset_classes``.)"""
    train = [] if eval_only else list(cfg.DATASETS.TRAIN)
    for name in train + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise UnknownNameError(f"dataset {name!r} is not registered; use --coco-dataset {name} JSON IMAGE_DIR")
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get('json_file'), meta.get('image_root')
        for path in (json_file, image_root):
            if path and not os.path.exists(path):
                root = os.getenv('DETECTRON2_DATASETS', 'datasets')
                raise MissingFileError(f'dataset {name!r}: {path} does not exist (builtin datasets are read '
                                       f'from $DETECTRON2_DATASETS={root}; see OBJECT_DETECTION.md)')
        if not (json_file and image_root):
            continue
        dataset = read_coco_json(json_file)
        masks = cfg.MODEL.MASK_ON and name in train
        # Detectron2's read_image applies EXIF orientation: the json's sizes must be the turned image's.
        check_coco_instances(dataset, json_file, image_root, mask_format=cfg.INPUT.MASK_FORMAT if masks else None,
                             evaluation=name in cfg.DATASETS.TEST, exif_transpose=True)
        check_some_readable((os.path.join(image_root, im['file_name']) for im in dataset.get('images', [])),
                            json_file, high_depth=False)  # Detectron2's reader would clip 16-bit grey white


def dataset_record(name: str, images: int) -> dict:
    """``eval_metrics.json``'s ``dataset``: ``coco`` for a set with COCO 2017's 80 categories (ids and names;
    Detectron2's builtin ``coco_2017_val`` or the same files registered under another name), any other by its
    registered name; the split is its image folder's name (``val2017``: the paper's rows)."""
    meta = MetadataCatalog.get(name)
    image_root, json_file = meta.get('image_root') or '', meta.get('json_file')
    split = os.path.basename(os.path.normpath(image_root)) if image_root else name
    is_coco = bool(json_file) and os.path.isfile(json_file) and is_coco_2017(read_coco_json(json_file))
    return eval_results.dataset_record('coco' if is_coco else name, split, images, annotations=json_file,
                                        classes=dataset_classes(name))


def check_eval_weights(cfg: CfgNode, args: argparse.Namespace) -> None:
    """``--eval-only`` scores trained heads: without MODEL.WEIGHTS (or a checkpoint to resume) it would score
    randomly initialised ones, as Deformable DETR's ``--eval`` without ``--resume`` is refused."""
    resumable = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint'))
    if args.eval_only and not cfg.MODEL.WEIGHTS and not resumable:
        raise InvalidInputError('--eval-only needs MODEL.WEIGHTS (a trained detector: a file, URL or released): '
                                'without one it would score randomly initialised heads')


def check_launch(args: argparse.Namespace) -> None:
    """Detectron2 launches one NCCL process per GPU: refuse more GPUs than this machine has, at once."""
    if args.num_gpus > 1 and args.num_gpus > torch.cuda.device_count():
        raise InvalidInputError(f'--num-gpus {args.num_gpus}: this machine has {torch.cuda.device_count()} CUDA '
                                'devices (Detectron2 runs one process per GPU)')


def setup(args: argparse.Namespace) -> CfgNode:
    cfg = get_cfg()
    add_mpvit_config(cfg)
    mark_num_classes_unset(cfg)
    merge_user_config(cfg, args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = model_zoo.resolve(cfg.MODEL.WEIGHTS, args.config_file)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE == 'cuda':
        cfg.MODEL.DEVICE = 'cpu'
    check_eval_weights(cfg, args)
    register_coco_datasets(args.coco_dataset)
    check_datasets(cfg, eval_only=args.eval_only)
    classes = follow_dataset_classes(
        cfg, cfg.DATASETS.TEST if args.eval_only else [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST])
    cfg.freeze()
    ensure_writable_dir(cfg.OUTPUT_DIR, 'OUTPUT_DIR')
    default_setup(cfg, args)
    (logger.warning if 'default' in classes else logger.info)(classes)
    return cfg


def main(args: argparse.Namespace):
    cfg = setup(args)
    # Find / download and check (no code in it) the file to load now, before any model is built: the one
    # named in OUTPUT_DIR/last_checkpoint when resuming, else MODEL.WEIGHTS (the checkpointer then reads the
    # same local copy: a URL is downloaded once).
    last = os.path.join(cfg.OUTPUT_DIR, 'last_checkpoint')
    if args.resume and os.path.isfile(last):
        with open(last) as f:
            local_checkpoint(os.path.join(cfg.OUTPUT_DIR, f.read().strip()))
    elif cfg.MODEL.WEIGHTS and (is_url(cfg.MODEL.WEIGHTS) or '://' not in cfg.MODEL.WEIGHTS):
        local_checkpoint(cfg.MODEL.WEIGHTS)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        tested = dataset_meta(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None  # the names must agree too
        checkpointer = MPViTCheckpointer(model, save_dir=cfg.OUTPUT_DIR, heads_must_fit=True, dataset_meta=tested)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        trainer.train()
        results = getattr(trainer, 'eval_results', None)  # what the final evaluation measured
    if comm.is_main_process() and results:
        tested = list(cfg.DATASETS.TEST)
        record = dataset_record(tested[0], len(DatasetCatalog.get(tested[0]))) if len(tested) == 1 else None
        eval_results.write_eval_metrics(os.path.join(cfg.OUTPUT_DIR, 'eval_metrics.json'), 'detectron2',
                                     dict(results), config=args.config_file, model=cfg.MODEL.MPVIT.NAME,
                                     dataset=record)
    return results


def argument_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser()
    parser.add_argument('--coco-dataset', nargs=3, action='append', metavar=('NAME', 'JSON', 'IMAGE_DIR'),
                        help='register a COCO-format dataset under NAME (repeatable)')
    return parser


if __name__ == '__main__':
    args = argument_parser().parse_args()
    print('Command Line Args:', args, file=sys.stderr)
    with user_errors_in_one_line():
        check_launch(args)
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))

