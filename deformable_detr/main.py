"""Train and evaluate Deformable DETR + MPViT on COCO (the original recipe, on Hugging Face transformers).

Train, 8 GPUs:   torchrun --nproc_per_node 8 deformable_detr/main.py -c configs/deformable_detr/mpvit_small.yaml \\
                     --coco-path datasets/coco --pretrained <mpvit_small.pth file or URL>
Resume:          the same command with --resume output/deformable_detr/mpvit_small/checkpoint.pth
Evaluate:        python deformable_detr/main.py -c configs/deformable_detr/mpvit_small.yaml --coco-path datasets/coco \\
                     --eval --resume <released checkpoint, original layout, file or URL>
                 (--resume released: the authors' checkpoint of the config)
Your own data:   the same commands with --coco-path pointing at it; the class count follows its categories
                 (--pretrained released fine-tunes the authors' COCO detector, with a new class head)
Draw:            python deformable_detr/demo.py IMAGE... --weights OUTPUT_DIR/checkpoint.pth -c CONFIG

Data layout (the original's): COCO_PATH/{train2017,val2017}/*.jpg and
COCO_PATH/annotations/instances_{train2017,val2017}.json (``--train-set`` / ``--val-set`` rename the splits).
Every epoch writes OUTPUT_DIR/checkpoint.pth atomically (the keys every driver's training checkpoint has,
``mpvit.training.CHECKPOINT_KEYS``) and OUTPUT_DIR/log.txt (one JSON line per epoch); --resume FILE or
--auto-resume continues from it with the optimizer, scheduler, scaler, sampler and RNG state, so the run equals
an uninterrupted one. The checkpoint also names the classes (``dataset_meta``) and the evaluation input
(``preprocess``).
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import contextlib
import io
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import init_distributed_device
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, tv_tensors
from torchvision.datasets import wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from transformers import DeformableDetrImageProcessor

from mpvit import eval_results, model_zoo
from mpvit.checkpoint import (
    CheckpointError,
    local_checkpoint,
    read_checkpoint,
    require_task_weights,
    unwrap_checkpoint,
)
from mpvit.coco_checks import check_coco_instances, coco_categories, coco_label_space, is_coco_2017, read_coco_file
from mpvit.deformable_detr import (
    build_deformable_detr,
    global_box_normaliser,
    head_classes,
    is_original_layout,
    load_detector_weights,
    param_groups,
    weighted_loss,
)
from mpvit.errors import DivergenceError, InvalidInputError, MissingFileError, first_few
from mpvit.images import check_some_readable, decode_error, open_rgb, unreadable_error, warn_unreadable
from mpvit.models import BATCH_PATHS
from mpvit.training import (
    LOG_FILE,
    LossWatch,
    align_gradient_strides,
    all_reduce_sum,
    autocast,
    check_minimums,
    count_parameters,
    ensure_writable_dir,
    epoch_row,
    is_main_process,
    parse_args_with_config,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    setup_logging,
    user_errors_in_one_line,
    write_log,
)

_logger = logging.getLogger('mpvit.deformable_detr')


# ------------------------------------------------------------------------------------------------ data

class RandomSizeCrop(v2.Transform):
    """Crop a random h x w region with both sides drawn from [min_size, min(side, max_size)] (the original's)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: List) -> Dict:
        height, width = v2.query_size(flat_inputs)
        w = random.randint(min(width, self.min_size), min(width, self.max_size))
        h = random.randint(min(height, self.min_size), min(height, self.max_size))
        return dict(top=random.randint(0, height - h), left=random.randint(0, width - w), height=h, width=w)

    def transform(self, inpt, params: Dict):
        return self._call_kernel(F.crop, inpt, **params)


def build_transforms(train: bool, args: argparse.Namespace) -> v2.Compose:
    """The original multi-scale augmentation: flip, then a resize of the shorter side to one of
    ``--train-sizes``, or (half of the time) a resize to ``--crop-resize``, a random crop of
    ``--crop-range`` and that resize; evaluation resizes to ``--test-size``. Longer side <= ``--max-size``."""
    if train:
        resize = v2.RandomShortestSize(args.train_sizes, max_size=args.max_size)
        geometric = [
            v2.RandomHorizontalFlip(),
            v2.RandomChoice([
                resize,
                v2.Compose([v2.RandomShortestSize(args.crop_resize), RandomSizeCrop(*args.crop_range), resize]),
            ]),
            v2.SanitizeBoundingBoxes(labels_getter=lambda sample: sample[1]['labels']),
        ]
    else:
        geometric = [v2.RandomShortestSize([args.test_size], max_size=args.max_size)]
    normalise = v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return v2.Compose([*geometric, v2.ToDtype(torch.float32, scale=True), normalise])


class _CocoImages(datasets.CocoDetection):
    """torchvision's COCO reader of an already parsed (and checked) instances dict, with 16-bit grey images
    scaled to 8 bits (PIL would clip them white)."""

    def __init__(self, root: str, dataset: Dict):
        datasets.VisionDataset.__init__(self, root)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs.keys())

    def _load_image(self, id: int) -> Image.Image:
        return open_rgb(os.path.join(self.root, self.coco.loadImgs(id)[0]['file_name']))


class CocoDetection(Dataset):
    """COCO instances read by torchvision (``wrap_dataset_for_transforms_v2``) in the original's target form:
    crowd annotations dropped, boxes clipped to the image and empty ones dropped, category ids kept as
    labels, boxes normalised ``cxcywh`` after the transforms.

    Refuses, before any model is built, listed images missing on disk and category ids that are not
    below ``num_classes`` (``None``: any id among the file's categories; ``label_space`` is what it needs)."""

    def __init__(self, image_dir: Path, annotation_file: Path, transforms: v2.Compose, num_classes: int | None,
                 train: bool = False):
        for path in (annotation_file, image_dir):
            if not path.exists():
                raise MissingFileError(f'COCO data: {path} does not exist (see deformable_detr/README.md)')
        raw = read_coco_file(str(annotation_file))
        # Every check (areas filled in) on the parsed file, before pycocotools indexes it: its index fails on
        # missing keys with a bare KeyError. Validation sets are scored, so they need images and annotations.
        # torchvision's reader ignores EXIF orientation, so the json's sizes must be those stored.
        check_coco_instances(raw, str(annotation_file), str(image_dir), evaluation=not train, exif_transpose=False)
        dataset = _CocoImages(str(image_dir), raw)
        self.annotation_file = annotation_file
        self.label_space = coco_label_space(dataset.coco.dataset, str(annotation_file))
        self.meta = coco_categories(dataset.coco.dataset)
        if num_classes is not None and self.label_space > num_classes:
            raise InvalidInputError(f'--num-classes {num_classes} does not fit the data: {annotation_file} has '
                                    f'category ids up to {self.label_space - 1}, so needs {self.label_space} '
                                    '(leave --num-classes out to follow the data)')
        check_some_readable((image_dir / im['file_name'] for im in dataset.coco.dataset['images']),
                            str(annotation_file))
        self.train, self.left_out = train, 0
        self.coco, self.ids, self.image_dir = dataset.coco, dataset.ids, image_dir
        for ann in self.coco.anns.values():  # optional in COCO files; torchvision's wrapper needs it when asked for
            ann.setdefault('iscrowd', 0)
        self.samples = wrap_dataset_for_transforms_v2(dataset, target_keys={'image_id', 'boxes', 'labels', 'iscrowd'})
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        """Training leaves an unreadable image out (the next readable one takes its place, with a warning
        naming it); evaluation refuses it in one line."""
        for offset in range(len(self) if self.train else 1):
            try:
                return self._sample((index + offset) % len(self))
            except OSError:
                path = self.image_dir / self.coco.imgs[self.ids[(index + offset) % len(self)]]['file_name']
                error = decode_error(path)  # the image itself, or something else (which keeps its traceback)
                if error is None:
                    raise
                if not self.train:
                    raise unreadable_error(path, error) from None
                self.left_out += 1
                warn_unreadable(path, error, self.left_out)
        raise InvalidInputError(f'no readable image in {self.image_dir}')

    def _sample(self, index: int):
        image, target = self.samples[index]
        image, image_id = F.to_image(image), target['image_id']
        h, w = image.shape[-2:]
        if 'boxes' in target:  # torchvision leaves the keys out for an image without annotations
            keep = ~torch.tensor(target['iscrowd'], dtype=torch.bool)
            boxes = F.clamp_bounding_boxes(tv_tensors.wrap(target['boxes'][keep].float(), like=target['boxes']))
            labels = target['labels'][keep]
        else:
            boxes, labels = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format='XYXY', canvas_size=(h, w)), \
                torch.zeros(0, dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = dict(boxes=tv_tensors.wrap(boxes[keep], like=boxes), labels=labels[keep])
        image, target = self.transforms(image, target)
        out_h, out_w = image.shape[-2:]
        cxcywh = F.convert_bounding_box_format(target['boxes'], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        normalised = cxcywh.as_subclass(torch.Tensor) / torch.tensor([out_w, out_h, out_w, out_h])
        return image, dict(class_labels=target['labels'], boxes=normalised, image_id=image_id, orig_size=(h, w))


# Pads batches and post-processes detections as transformers does for its own Deformable DETR.
PROCESSOR = DeformableDetrImageProcessor()


def collate(batch: List[Tuple[torch.Tensor, Dict]]) -> Dict:
    """Pad to the largest image of the batch (the image processor's padding); pixel_mask marks the real pixels."""
    size = (max(img.shape[1] for img, _ in batch), max(img.shape[2] for img, _ in batch))
    padded = [PROCESSOR.pad(img, size)[:2] for img, _ in batch]
    return dict(pixel_values=torch.stack([p[0] for p in padded]), pixel_mask=torch.stack([p[1] for p in padded]),
                targets=[t for _, t in batch])


# ------------------------------------------------------------------------------------------- train / eval

def log(message: str) -> None:
    """A progress line through the driver's logger (the main process's only, once :func:`setup_logging` ran)."""
    _logger.info(message)


def due(step: int, steps: int, every: int, last: float) -> bool:
    """Whether to log a loop's progress: every ``every`` steps, the last one, and at least every 30 s (a CPU
    run, or a large set at a long ``--print-freq``, is not silent for minutes)."""
    return step % every == 0 or step == steps - 1 or time.time() - last > 30


def stop_on_non_finite_outputs(model: torch.nn.Module, watch: LossWatch) -> None:
    """Check the decoder's outputs (every layer's, from which the boxes and class scores come) in training:
    non-finite boxes would otherwise fail in transformers' matcher with a message about box format, before
    the loss could be checked."""
    def check(module, inputs, outputs) -> None:
        if not module.training:
            return
        finite = bool(torch.isfinite(outputs.intermediate_hidden_states).all()
                      and torch.isfinite(outputs.intermediate_reference_points).all())
        if not watch.everywhere(finite, outputs.intermediate_hidden_states.device):  # all processes stop together
            raise DivergenceError(watch.message('the decoder outputs are not finite' if not finite else
                                                'the decoder outputs of another process are not finite', watch.current))

    model.model.register_forward_hook(check)


def train_one_epoch(model, loader, optimizer, scaler, device, epoch: int, args,
                    watch: LossWatch | None = None) -> Dict[str, float]:
    model.train()
    watch = watch or LossWatch()
    totals: Dict[str, float] = {}
    start = last = time.time()
    steps = len(loader) if args.max_iters <= 0 else min(len(loader), args.max_iters)
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        labels = [{k: t[k].to(device) for k in ('class_labels', 'boxes')} for t in batch['targets']]
        watch.current = f'epoch {epoch} step {step + 1}/{steps}'
        with autocast(args.amp, device):
            out = model(pixel_values=batch['pixel_values'].to(device), pixel_mask=batch['pixel_mask'].to(device),
                        labels=labels)
        loss = weighted_loss(out.loss_dict) * global_box_normaliser(labels, device)
        watch.check(loss, watch.current)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_max_norm > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
        values = {'loss': loss.item(), **{k: out.loss_dict[k].item() for k in ('loss_ce', 'loss_bbox', 'loss_giou')}}
        for k, v in values.items():
            totals[k] = totals.get(k, 0.) + v
        if due(step, steps, args.print_freq, last):
            last = time.time()
            parts = ' '.join(f'{k} {v:.4f}' for k, v in values.items())
            log(f'epoch {epoch} [{step + 1}/{steps}] {parts} lr {optimizer.param_groups[0]["lr"]:.2e} '
                f'({(time.time() - start) / (step + 1):.2f} s/it)')
    *sums, all_steps = all_reduce_sum([*totals.values(), steps], device)  # averaged over every process's steps
    return {**{k: v / all_steps for k, v in zip(totals, sums)}, 'lr': optimizer.param_groups[0]['lr'], 'steps': steps}


@torch.no_grad()
def evaluate(model, loader, coco_gt: COCO, device, args) -> Dict[str, float]:
    """COCO box AP with pycocotools; top-100 (query, class) pairs per image, as the original.

    Draws nothing from the global RNG (the val transform's draws are forked off): a run resumed from the
    checkpoint written before this evaluation continues as the uninterrupted one, at any worker count."""
    with torch.random.fork_rng(devices=[]):
        return _evaluate(model, loader, coco_gt, device, args)


@torch.no_grad()
def detect(model, batch: Dict, device, args) -> List[Dict[str, torch.Tensor]]:
    """Detections of a ``collate``d batch as evaluation scores them (and the demo draws them): per image the
    top 100 (query, class) pairs, ``scores``, ``labels`` (category ids) and ``boxes`` (x0, y0, x1, y1 in the
    pixels of the image before the transform, whose size is the target's ``orig_size``)."""
    with autocast(args.amp, device):
        out = model(pixel_values=batch['pixel_values'].to(device), pixel_mask=batch['pixel_mask'].to(device))
    out.logits, out.pred_boxes = out.logits.float(), out.pred_boxes.float()
    sizes = torch.tensor([t['orig_size'] for t in batch['targets']], device=device)
    return PROCESSOR.post_process_object_detection(out, threshold=0.0, target_sizes=sizes, top_k=100)


def _evaluate(model, loader, coco_gt: COCO, device, args) -> Dict[str, float]:
    model.eval()
    results = []
    start = last = time.time()
    for step, batch in enumerate(loader):
        for target, det in zip(batch['targets'], detect(model, batch, device, args)):
            for score, label, (x0, y0, x1, y1) in zip(det['scores'].tolist(), det['labels'].tolist(),
                                                      det['boxes'].tolist()):
                results.append(dict(image_id=target['image_id'], category_id=label, bbox=[x0, y0, x1 - x0, y1 - y0],
                                    score=score))
        if due(step, len(loader), args.print_freq, last):
            last = time.time()
            log(f'eval [{step + 1}/{len(loader)}] ({(last - start) / (step + 1):.2f} s/it)')
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)
        # DistributedSampler pads the set with repeated images so every rank gets as many: keep each image's
        # detections from the first rank that has them, so no image counts twice (as the original).
        owner: Dict[int, int] = {}
        for rank, part in enumerate(gathered):
            for r in part:
                owner.setdefault(r['image_id'], rank)
        results = [r for rank, part in enumerate(gathered) for r in part if owner[r['image_id']] == rank]
    if not is_main_process():
        return {}
    counts = {'images': len({r['image_id'] for r in results}), 'detections': len(results)}
    if not results:
        log('no detections; AP is 0')
        return {'AP': 0.0, **counts}
    log(f'scoring {len(results)} detections with pycocotools (a few minutes on COCO val2017)')
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), 'bbox')
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    names = ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
    return {**{n: float(v) * 100 for n, v in zip(names, coco_eval.stats[:6])}, **counts}


# ------------------------------------------------------------------------------------------------ main

def build_model(args: argparse.Namespace, sync_bn: bool) -> torch.nn.Module:
    """The detector ``args`` describe, its backbone's stages batched if ``--batch-paths`` says so."""
    return build_deformable_detr(args.backbone, args.num_classes, args.num_queries, args.num_feature_levels,
                                 args.drop_path, sync_bn=sync_bn, batch_paths=args.batch_paths)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add('-c', '--config', default='', help='YAML file of argument defaults')
    add('--backbone', default='mpvit_small')
    add('--drop-path', type=float, default=0.0, help='backbone stochastic depth (the original: 0 for every variant)')
    add('--batch-paths', choices=BATCH_PATHS, default='auto',
        help="'always': each stage's transformer paths as one batch (mpvit.set_batch_paths; not yet measured "
        "faster on a GPU); 'auto' (default): path by path")
    add('--pretrained', default='', help='initial weights, file or URL: a classification (or any MPViT) checkpoint '
        "fills the backbone; a Deformable DETR one everything but a class head of another size ('released': the "
        "authors' COCO detector of the config)")
    add('--num-classes', type=int, default=91,
        help='largest category id + 1 (91 for COCO). Only given on the command line does it count: otherwise '
             "it follows the training annotation file's categories (evaluation: the checkpoint's head)")
    add('--num-queries', type=int, default=300)
    add('--num-feature-levels', type=int, default=4)
    add('--lr', type=float, default=2e-4)
    add('--lr-backbone', type=float, default=2e-5)
    add('--lr-linear-proj-mult', type=float, default=0.1)
    add('--weight-decay', type=float, default=1e-4)
    add('--epochs', type=int, default=50)
    add('--lr-drop', type=int, default=40)
    add('--batch-size', type=int, default=2, help='per GPU')
    add('--clip-max-norm', type=float, default=0.1)
    add('--sync-bn', action='store_true')
    add('--amp', choices=('none', 'bf16', 'fp16'), default='none')
    add('--train-sizes', type=int, nargs='+', default=list(range(480, 801, 32)), help='shorter sides, training')
    add('--crop-resize', type=int, nargs='+', default=[400, 500, 600], help='shorter sides before the crop')
    add('--crop-range', type=int, nargs=2, default=[384, 600], help='crop side range')
    add('--max-size', type=int, default=1333, help='longest side')
    add('--test-size', type=int, default=800, help='shorter side, evaluation')
    add('--coco-path', default='datasets/coco')
    add('--train-set', default='train2017')
    add('--val-set', default='val2017')
    add('--output-dir', default='output/deformable_detr')
    add('--resume', default='', help='our checkpoint or a released one (original layout), file or URL')
    add('--auto-resume', action='store_true', help='continue from OUTPUT_DIR/checkpoint.pth if it exists')
    add('--eval', action='store_true')
    add('--num-workers', type=int, default=2)
    add('--seed', type=int, default=42)
    add('--print-freq', type=int, default=50)
    add('--max-iters', type=int, default=0, help='limit iterations per epoch (smoke tests)')
    add('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parse_args_with_config(parser, argv)
    # The configs' num_classes is COCO's (tools build the model from it without data); only the user's own
    # --num-classes overrides the data.
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument('--num-classes', type=int)
    args.num_classes_set = probe.parse_known_args(argv)[0].num_classes is not None
    check_minimums(parser, args, dict(epochs=1, lr_drop=1, num_queries=1, num_classes=1, batch_size=1, test_size=1,
                                      max_size=1, print_freq=1, num_workers=0, max_iters=0))
    if args.num_feature_levels < 3:  # stages 2-4 of the backbone, plus strided convolutions for the rest
        parser.error(f'--num-feature-levels {args.num_feature_levels}: must be at least 3 (the backbone gives 3)')
    if not timm.is_model(args.backbone):
        parser.error(f"--backbone {args.backbone}: unknown model; MPViT variants: "
                     f"{', '.join(timm.list_models('mpvit_*'))}")
    if args.auto_resume and not args.resume and (Path(args.output_dir) / 'checkpoint.pth').is_file():
        args.resume = str(Path(args.output_dir) / 'checkpoint.pth')
    args.resume = model_zoo.resolve(args.resume, args.config or None, 'deformable_detr_' + args.backbone)
    # --pretrained released: the authors' COCO detector of the config, to fine-tune (a new class head if needed)
    args.pretrained = model_zoo.resolve(args.pretrained, args.config or None, 'deformable_detr_' + args.backbone)
    if args.eval and not args.resume:
        parser.error('--eval needs --resume (a Deformable DETR checkpoint, or released): without one it would score '
                     'randomly initialised heads')
    return args


def _names(meta: Dict) -> Dict[int, str]:
    return dict(zip(meta['category_ids'], meta['classes']))


def check_same_classes(known: Dict, data: Dict, known_what: str, data_what: str, error=InvalidInputError) -> None:
    """Refuse data whose categories (id -> name) are not among ``known``'s (a checkpoint's ``dataset_meta`` or
    the training file's): the labels would score, or name, the wrong classes."""
    ours, theirs = _names(known), _names(data)
    wrong = [f'{i}: {theirs[i]!r}' + (f' (not {ours[i]!r})' if i in ours else ' (unknown)')
             for i in sorted(theirs) if ours.get(i) != theirs[i]]
    if wrong:
        raise error(f'{data_what} has categories that {known_what} does not: {first_few(wrong, show=3)}')


def class_count(args, train_set: CocoDetection | None, val_set: CocoDetection, checkpoint) -> int:
    """The outputs of the class head (labels are category ids, so the largest id + 1, as the reference code:
    91 for COCO): the user's ``--num-classes``; else the evaluated checkpoint's head; else the training
    file's. Every pair that must agree is checked here, before any model is built, naming both numbers."""
    head = head_classes(checkpoint) if checkpoint is not None else None
    data = train_set or val_set
    if args.num_classes_set:
        count, source = args.num_classes, f'--num-classes {args.num_classes}'
    elif args.eval and head is not None:  # the head decides; the data must need exactly as many
        count = source = head
        if head != val_set.label_space:
            raise CheckpointError(
                f'{args.resume} has a class head of {head} outputs, but {val_set.annotation_file} needs '
                f'{val_set.label_space} (largest category id {val_set.label_space - 1}): was it trained on other '
                f'classes? (--num-classes {head} evaluates it on data with fewer classes)')
    else:
        count = data.label_space
        source = f'{data.annotation_file} (largest category id {count - 1})'
    for part in (train_set, val_set):
        if part is not None and part.label_space > count:
            needs = f'{part.annotation_file} has category ids up to {part.label_space - 1}, so needs {part.label_space}'
            if args.num_classes_set:
                raise InvalidInputError(f'--num-classes {count} does not fit the data: {needs} '
                                        '(leave --num-classes out to follow the data)')
            raise InvalidInputError(f'{source} gives {count} classes but {needs}: give both files the same categories')
    if train_set is not None:
        check_same_classes(train_set.meta, val_set.meta, train_set.annotation_file, val_set.annotation_file)
    if head is not None and head != count:
        hint = '' if args.num_classes_set else (
            f'; a run of this data trained with --num-classes {head} continues with --num-classes {head}; to start '
            'from it on other classes, fine-tune it with --pretrained')
        raise CheckpointError(f'{args.resume} has a class head of {head} outputs, but {source} '
                              f'{"asks for" if args.num_classes_set else "needs"} {count}{hint}')
    meta = checkpoint.get('dataset_meta') if isinstance(checkpoint, dict) else None
    if isinstance(meta, dict) and 'category_ids' in meta and 'classes' in meta:
        for part in (train_set, val_set):
            if part is not None:
                check_same_classes(meta, part.meta, f'{args.resume} (trained on {len(meta["classes"])} classes)',
                                   part.annotation_file, CheckpointError)
    if not args.num_classes_set and not args.eval:
        log(f'{count} class outputs (largest category id + 1) from the categories of {data.annotation_file}')
    return count


def preprocess(args) -> Dict:
    """What the model's evaluation input was (stored in the checkpoint for the demo and other users of it)."""
    return dict(test_size=args.test_size, max_size=args.max_size, mean=list(IMAGENET_DEFAULT_MEAN),
                std=list(IMAGENET_DEFAULT_STD))


def dataset_record(args, val_set: CocoDetection) -> Dict:
    """The evaluated data for ``eval_metrics.json``: ``coco`` when its categories are COCO's 80 (ids and
    names), else the data folder's name; the split is the image folder's name."""
    name = 'coco' if is_coco_2017(val_set.coco.dataset) else (Path(args.coco_path).resolve().name
                                                               or val_set.annotation_file.stem)
    return eval_results.dataset_record(name, Path(args.val_set).name, len(val_set),
                                       annotations=val_set.annotation_file, classes=val_set.meta['classes'])


def main(argv=None) -> Dict[str, float]:
    args = get_args(argv)
    if args.resume or args.pretrained:  # download / check before any work (a resume holds the backbone too)
        local_checkpoint(args.resume or args.pretrained)
    output_dir = ensure_writable_dir(args.output_dir)
    device = init_distributed_device(args)  # torchrun / SLURM; 'cuda' becomes this process's GPU
    world, local = args.world_size, args.local_rank
    setup_logging(_logger.name)
    seed_everything(args.seed + args.rank)

    root = Path(args.coco_path)
    user_classes = args.num_classes if args.num_classes_set else None
    log(f'reading {root / "annotations" / f"instances_{args.val_set}.json"}')
    val_set = CocoDetection(root / args.val_set, root / 'annotations' / f'instances_{args.val_set}.json',
                            build_transforms(False, args), user_classes)
    if not args.eval:
        log(f'reading {root / "annotations" / f"instances_{args.train_set}.json"}')
    train_set = None if args.eval else CocoDetection(
        root / args.train_set, root / 'annotations' / f'instances_{args.train_set}.json', build_transforms(True, args),
        user_classes, train=True)
    checkpoint = read_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None and args.eval and not is_original_layout(unwrap_checkpoint(checkpoint)):
        require_task_weights(unwrap_checkpoint(checkpoint), 'class_embed.', args.resume, 'Deformable DETR')
    elif checkpoint is not None and not any(k.startswith('class_embed.') for k in unwrap_checkpoint(checkpoint)):
        # Another driver's training checkpoint has the same keys (optimizer, lr_scheduler, epoch ...), not ours.
        raise CheckpointError(f'--resume {args.resume}: no Deformable DETR weights (class_embed.*) in it; --resume '
                              'continues a Deformable DETR run (start from other weights with --pretrained)')
    args.num_classes = class_count(args, train_set, val_set, checkpoint)
    pretrained = read_checkpoint(args.pretrained) if args.pretrained and not args.resume else None

    log(f'building Deformable DETR + {args.backbone} ({args.num_classes} class outputs)')
    model = build_model(args, sync_bn=args.sync_bn and world > 1 and device.type == 'cuda')
    if pretrained is not None:  # a resumed / evaluated checkpoint holds the backbone anyway
        head = head_classes(pretrained)
        load_detector_weights(model, args.pretrained, checkpoint=pretrained, head='reset')
        if head is None:
            log(f'backbone initialised from {args.pretrained}')
        else:
            log(f'detector initialised from {args.pretrained}' + ('' if head == args.num_classes else
                f', except its class head ({head} outputs; the data needs {args.num_classes}): a new one'))
    if args.sync_bn and world > 1 and device.type != 'cuda':
        log('--sync-bn: SyncBatchNorm needs CUDA; using per-process BatchNorm on CPU')
    model.to(device)
    log(f'Deformable DETR + {args.backbone}: {count_parameters(model):,} trainable parameters')

    val_sampler = DistributedSampler(val_set, shuffle=False) if world > 1 else None
    # Its own generator: evaluating draws nothing from the global RNG, which a checkpoint restores.
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, collate_fn=collate,
                            num_workers=args.num_workers, generator=torch.Generator().manual_seed(0))

    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr_backbone, args.lr_linear_proj_mult),
                                  lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    start_epoch, step, rows = 0, 0, []
    if checkpoint is not None:
        load_detector_weights(model, args.resume, checkpoint=checkpoint)
        ours = isinstance(checkpoint, dict) and 'model' in checkpoint and not is_original_layout(checkpoint['model'])
        if not args.eval and ours and 'optimizer' in checkpoint:
            start_epoch, step, rows = restore_training_state(checkpoint, args.resume, optimizer, scheduler, scaler,
                                                             output_dir / LOG_FILE)
        log(f'resumed from {args.resume}' + (f' at epoch {start_epoch}' if start_epoch else ''))
    checkpoint = pretrained = None  # their memory (optimizer state, a whole detector) is not needed any more

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(align_gradient_strides(model),
                                                              device_ids=[local] if device.type == 'cuda' else None)
    if args.eval:
        stats = evaluate(ddp_model, val_loader, val_set.coco, device, args)
        if is_main_process():
            eval_results.write_eval_metrics(output_dir / 'eval_metrics.json', 'deformable_detr', stats,
                                            config=args.config or None, model=args.backbone,
                                            dataset=dataset_record(args, val_set))
            log(f'* box AP {stats.get("AP", 0):.2f}')
        return stats

    train_sampler = DistributedSampler(train_set, seed=args.seed) if world > 1 else None
    # Shuffling and the workers' seeds come from this generator, re-seeded per epoch: a resumed epoch
    # sees the same images and augmentations as in an uninterrupted run.
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler,
                              shuffle=train_sampler is None, generator=generator, collate_fn=collate,
                              num_workers=args.num_workers, drop_last=True)
    stats: Dict[str, float] = {}
    watch = LossWatch()
    stop_on_non_finite_outputs(model, watch)
    for epoch in range(start_epoch, args.epochs):
        generator.manual_seed(args.seed + epoch)
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        train_stats = train_one_epoch(ddp_model, train_loader, optimizer, scaler, device, epoch, args, watch)
        step += train_stats.pop('steps')
        scheduler.step()
        # Saved before the (long) evaluation, which draws nothing from the RNG: its rows are the epochs before.
        save_training_checkpoint(output_dir / 'checkpoint.pth', model, optimizer, scheduler, scaler, epoch=epoch,
                                 step=step, args=args, log=rows, watch=watch,
                                 extra=dict(dataset_meta=train_set.meta, preprocess=preprocess(args)))
        stats = evaluate(ddp_model, val_loader, val_set.coco, device, args)
        rows.append(epoch_row(epoch, train_stats, stats, step=step))
        if is_main_process():
            write_log(output_dir / LOG_FILE, rows)
            log(f'epoch {epoch}: box AP {stats.get("AP", 0):.2f}')
    if is_main_process() and stats:
        eval_results.write_eval_metrics(output_dir / 'eval_metrics.json', 'deformable_detr', stats,
                                        config=args.config or None, model=args.backbone,
                                        dataset=dataset_record(args, val_set))
    return stats


if __name__ == '__main__':
    try:
        with user_errors_in_one_line():
            main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(0)
