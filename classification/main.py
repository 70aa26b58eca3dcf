"""ImageNet training and evaluation of MPViT with the DeiT recipe, on timm's parts.

Single process:     python classification/main.py -c configs/classification/mpvit_small.yaml --data-path /data/imagenet
Several GPUs:       torchrun --nproc_per_node 8 classification/main.py -c ... --data-path ...
Evaluate weights:   python classification/main.py --model mpvit_small --eval --resume <file or URL> --data-path ...
                    (--resume released: the authors' ImageNet checkpoint of --model)
Fine-tune:          python classification/main.py -c configs/classification/finetune.yaml --data-path /data/mine
                    (your classes from the folders; lr as given, warm-up in steps, layer-wise lr decay)
Throughput:         python classification/main.py --model mpvit_small --throughput --batch-size 128

Every epoch writes ``<output-dir>/checkpoint.pth`` atomically (the keys every driver's
training checkpoint has, ``mpvit.training.CHECKPOINT_KEYS``, plus ``pretrained_cfg``) and
rewrites ``<output-dir>/log.txt`` (one JSON line per epoch); ``--auto-resume`` continues
from it after an interruption with identical optimizer, scheduler, scaler, sampler and RNG state.
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import datetime
import json
import logging
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import ImageNetInfo, Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, init_distributed_device
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler, default_collate
from torchvision.datasets import ImageFolder

import mpvit
from mpvit import eval_results, model_zoo
from mpvit.check_data import check_imagefolder
from mpvit.checkpoint import (
    check_usable,
    load_backbone_weights,
    local_checkpoint,
    read_checkpoint,
)
from mpvit.errors import InvalidInputError, MissingFileError, first_few
from mpvit.images import check_some_readable, open_rgb, warn_unreadable
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
    loader_workers,
    parse_args_with_config,
    restore_training_state,
    save_training_checkpoint,
    seed_everything,
    setup_logging,
    user_errors_in_one_line,
    write_log,
)

_logger = logging.getLogger('mpvit.classification')

# Stochastic depth of the released models (DeiT recipe otherwise identical across variants).
DROP_PATH = {'mpvit_tiny': 0.0, 'mpvit_xsmall': 0.0, 'mpvit_small': 0.05, 'mpvit_base': 0.3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-c', '--config', help='YAML file whose keys override these defaults (command line wins)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='mpvit_small')
    g.add_argument('--drop-path', type=float, default=None, help='default: the variant\'s (T/XS 0, S 0.05, B 0.3)')
    g.add_argument('--batch-paths', choices=mpvit.BATCH_PATHS, default='auto',
                   help="'always': each stage's transformer paths as one batch (mpvit.set_batch_paths; not yet "
                        "measured faster on a GPU); 'auto' (default): path by path")
    g.add_argument('--input-size', type=int, default=224)
    g.add_argument('--pretrained', default='', help='initialise from a checkpoint file or URL (fine-tuning)')
    g = p.add_argument_group('data')
    g.add_argument('--data-path', default='', help='ImageFolder root with train/ and val/')
    g.add_argument('--batch-size', type=int, default=128, help='per process')
    g.add_argument('--num-workers', type=int, default=loader_workers(8), help='default: 8, at most one per CPU')
    g.add_argument('--crop-pct', type=float, default=0.875,
                   help='evaluation: resize to input-size / crop-pct, centre crop (the authors: 256 -> 224)')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='RandomResizedCrop area range')
    g.add_argument('--interpolation', default='bicubic')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="RandAugment policy ('none' to disable)")
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--reprob', type=float, default=0.25)
    g.add_argument('--remode', default='pixel')
    g.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--mixup', type=float, default=0.8)
    g.add_argument('--cutmix', type=float, default=1.0)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--smoothing', type=float, default=0.1)
    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--lr', type=float, default=None,
                   help='the lr of the classifier, used as given; default: 5e-4 x total batch / 512 (DeiT)')
    g.add_argument('--layer-decay', type=float, default=None,
                   help="timm's layer-wise lr decay (fine-tuning): the stages before the head train at lr x "
                        'decay^depth (e.g. 0.65)')
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--warmup-steps', type=int, default=None,
                   help='warm up over this many optimizer steps and change the lr after every step (cosine over '
                        'all steps) instead of once per epoch (fine-tuning on small data)')
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--accum-steps', type=int, default=1, help='gradient accumulation')
    g.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='bf16')
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model (training, evaluation, throughput); backend: inductor')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    g.add_argument('--model-ema-decay', type=float, default=0.99996)
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default='output/classification')
    g.add_argument('--resume', default='', help='training checkpoint to continue, or weights to --eval')
    g.add_argument('--auto-resume', action='store_true', help='continue from <output-dir>/checkpoint.pth if present')
    g.add_argument('--run-epochs', type=int, default=None,
                   help='train at most this many epochs in this invocation (time-limited jobs)')
    g.add_argument('--eval', action='store_true')
    g.add_argument('--throughput', action='store_true')
    g.add_argument('--max-steps', type=int, default=None, help='stop each epoch after this many steps (smoke runs)')
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--deterministic', action='store_true', help='deterministic algorithms (slower)')
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_minimums(parser, args, dict(epochs=1, batch_size=1, accum_steps=1, input_size=32, num_workers=0,
                                      warmup_epochs=0, log_interval=1, run_epochs=1, max_steps=1, warmup_steps=0))
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        parser.error(f'--layer-decay {args.layer_decay}: must be in (0, 1]')
    if not timm.is_model(args.model):
        parser.error(f"--model {args.model}: unknown model; MPViT variants: {', '.join(timm.list_models('mpvit_*'))}")
    if args.drop_path is None:
        args.drop_path = DROP_PATH.get(args.model, 0.0)
    args.resume = model_zoo.resolve(args.resume, model=args.model)
    args.pretrained = model_zoo.resolve(args.pretrained, model=args.model)
    return args


# ---------------------------------------------------------------------------- data


class CheckedImageFolder(ImageFolder):
    """ImageFolder that names the path when it is missing or empty, and handles unreadable images.

    Training replaces an unreadable image by the next readable one (with a warning naming it), so that
    one bad file does not stop a long run. Evaluation never substitutes (``skip_unreadable``): the
    sample comes back as ``None``, :func:`collate_readable` leaves it out of the batch and counts it,
    and the metrics are over the images actually evaluated, with the count of skipped ones.
    """

    def __init__(self, root: str, skip_unreadable: bool = False, **kwargs):
        if not os.path.isdir(root):
            raise MissingFileError(f'dataset folder not found: {root}')
        try:
            super().__init__(root, loader=open_rgb, **kwargs)
        except FileNotFoundError as e:
            raise MissingFileError(f'{root}: {e}') from None
        self.skip_unreadable, self.left_out = skip_unreadable, 0

    def __getitem__(self, index: int):
        for offset in range(1 if self.skip_unreadable else len(self)):
            path = self.samples[(index + offset) % len(self)][0]
            try:
                return super().__getitem__((index + offset) % len(self))
            except OSError as e:  # PIL's UnidentifiedImageError / truncated files
                self.left_out += 1
                warn_unreadable(path, e, self.left_out)
        if self.skip_unreadable:
            return None
        raise InvalidInputError(f'no readable image in {self.root}')


def collate_readable(batch: list):
    """``default_collate`` of the readable samples, plus how many were left out (``None``)."""
    readable = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(readable)
    if not readable:
        return None, None, skipped
    images, targets = default_collate(readable)
    return images, targets, skipped


def check_data(args) -> None:
    """``python -m mpvit.check_data imagefolder``'s checks of the splits this run reads (evaluation: val/),
    every problem counted in one line before any model is built."""
    if not args.data_path:
        raise InvalidInputError('--data-path is required (an ImageFolder root with train/ and val/)')
    splits = ('val',) if args.eval else ('train', 'val')
    for split in sorted(splits, key=lambda name: name != 'val'):  # val/ first, as it is read first
        if not os.path.isdir(os.path.join(args.data_path, split)):
            raise MissingFileError(f'dataset folder not found: {os.path.join(args.data_path, split)}')
    check_imagefolder(args.data_path, splits).raise_errors()


def build_dataset(args, split: str) -> Dataset:
    if not args.data_path:
        raise InvalidInputError('--data-path is required (an ImageFolder root with train/ and val/)')
    training = split == 'train'
    transform = create_transform(
        args.input_size,
        is_training=training,
        auto_augment=None if args.aa in ('', 'none') else args.aa,
        color_jitter=args.color_jitter,
        interpolation=args.interpolation,
        re_prob=args.reprob,
        re_mode=args.remode,
        crop_pct=args.crop_pct,
        scale=tuple(args.scale),
    )
    return CheckedImageFolder(os.path.join(args.data_path, split), skip_unreadable=not training,
                              transform=transform)


def build_train_loader(args, dataset) -> DataLoader:
    if args.repeated_aug:
        # DeiT's rounding to 256 samples would empty a small dataset; round only when it is large enough.
        sampler = RepeatAugSampler(dataset, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                   selected_round=256 if len(dataset) >= 256 * args.world_size else 0)
    elif args.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, shuffle=True)
    else:
        sampler = RandomSampler(dataset)
    # No persistent workers: each epoch's workers are seeded from the main process's RNG, which a
    # checkpoint restores, so a resumed run draws the same augmentations as an uninterrupted one.
    return DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=args.device.startswith('cuda'), drop_last=True)


def build_val_loader(args, dataset) -> DataLoader:
    # Each rank evaluates a disjoint slice; sums are reduced, so no sample counts twice.
    indices = list(range(args.rank, len(dataset), args.world_size))
    return DataLoader(torch.utils.data.Subset(dataset, indices), args.batch_size,
                      sampler=SequentialSampler(indices), num_workers=args.num_workers,
                      pin_memory=args.device.startswith('cuda'), collate_fn=collate_readable)


def dataset_record(args, dataset: CheckedImageFolder, images: int) -> Dict:
    """The evaluated set for ``eval_metrics.json``: ``imagenet-1k`` when its classes are ImageNet-1k's
    synsets, else the folder's name; the fingerprint covers every file name and label."""
    root = Path(args.data_path)
    imagenet = dataset.classes == list(ImageNetInfo().label_names())
    names = [f'{Path(path).relative_to(dataset.root)} {label}' for path, label in dataset.samples]
    return eval_results.dataset_record('imagenet-1k' if imagenet else root.resolve().name, Path(dataset.root).name,
                                       images, fingerprint=eval_results.fingerprint_names(names),
                                       classes=dataset.classes)


# ---------------------------------------------------------------------------- checkpoints


# What the restored optimizer groups and scheduler state were built from: another value on resume would fail
# to load (other parameter groups) or be silently replaced by the saved schedule.
SCHEDULE_ARGS = ('epochs', 'layer_decay', 'warmup_steps', 'warmup_epochs', 'max_steps')


def check_same_schedule(state: Dict, args, what: str) -> None:
    saved = state.get('args') or {}
    changed = [f'--{k.replace("_", "-")} {saved[k]} (now {getattr(args, k)})' for k in SCHEDULE_ARGS
               if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise InvalidInputError(f'{what} was trained with {", ".join(changed)}: resume with the same values '
                                '(the optimizer groups and schedule are restored from it), or start a new run '
                                'from its weights with --pretrained')


def label_names(checkpoint) -> Optional[List[str]]:
    """The class names a checkpoint of this script stores (``pretrained_cfg``), if any."""
    cfg = checkpoint.get('pretrained_cfg') if isinstance(checkpoint, dict) else None
    names = cfg.get('label_names') if isinstance(cfg, dict) else None
    return list(names) if names is not None else None


def check_class_names(checkpoint, classes: List[str], what: str) -> None:
    """Refuse a checkpoint of this script trained on other classes than the data's (names or order): its
    classifier would fit and score the wrong classes. Checkpoints without names are not checked."""
    names = label_names(checkpoint)
    if names is None or names == list(classes):
        return
    differ = [f'{i}: {a!r} vs {b!r}' for i, (a, b) in enumerate(zip(names, classes)) if a != b]
    raise mpvit.CheckpointError(f'{what} was trained on {len(names)} classes that are not the data\'s {len(classes)} '
                                f'(checkpoint vs data, {first_few(differ, show=3) or "counts differ"}); '
                                'fine-tune it with --pretrained instead')


def build_scheduler(args, optimizer: torch.optim.Optimizer, steps_per_epoch: int = 0):
    """The authors' schedule: timm's cosine with linear warm-up, stepped once per epoch with the epoch index.

    With ``--warmup-steps`` the same cosine runs over optimizer steps (``step_update`` after each): a
    fine-tuning run of a few epochs on small data then warms up in steps, not in whole epochs at ~1e-6.
    Returns the scheduler and the number of epochs.
    """
    if getattr(args, 'warmup_steps', None) is None:
        return create_scheduler_v2(optimizer, 'cosine', num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                   warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=True)
    if steps_per_epoch < 1:
        raise ValueError('a per-step schedule (--warmup-steps) needs steps_per_epoch')
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr,
                                  warmup_t=args.warmup_steps, warmup_lr_init=args.warmup_lr, t_in_epochs=False)
    return scheduler, args.epochs


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW without weight decay on norms and biases (timm); ``--layer-decay`` gives each stage its own lr
    scale through the model's ``group_matcher`` (timm's scheduler multiplies each group's lr by it)."""
    return create_optimizer_v2(model, 'adamw', lr=args.lr, weight_decay=args.weight_decay,
                               layer_decay=args.layer_decay)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest lr of the groups: the classifier's under layer-wise decay."""
    return max(group['lr'] for group in optimizer.param_groups)


def pretrained_cfg(args, class_names: List[str]) -> Dict:
    """What a checkpoint needs to be used on its own, in timm's ``pretrained_cfg`` form: the classes (in
    label order), the input size and the evaluation transform the model was trained and evaluated with."""
    cfg = resolve_data_config({'input_size': (3, args.input_size, args.input_size), 'crop_pct': args.crop_pct,
                               'interpolation': args.interpolation}, model=None)
    return dict(architecture=args.model, num_classes=len(class_names), label_names=list(class_names),
                input_size=list(cfg['input_size']), mean=list(cfg['mean']), std=list(cfg['std']),
                crop_pct=cfg['crop_pct'], interpolation=cfg['interpolation'])


# ---------------------------------------------------------------------------- loops


def train_one_epoch(args, model, loader, criterion, optimizer, scaler, mixup, epoch, step,
                    ema: Optional[ModelEmaV3] = None, watch: Optional[LossWatch] = None, scheduler=None) -> Dict:
    model.train()
    watch = watch or LossWatch()
    steps_per_epoch = len(loader) // args.accum_steps
    if args.max_steps:
        steps_per_epoch = min(steps_per_epoch, args.max_steps)
    loss_sum, seen, start = 0.0, 0, time.time()
    last_log = start
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        if i // args.accum_steps >= steps_per_epoch:
            break
        images = images.to(args.device, non_blocking=True)
        targets = targets.to(args.device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        sync = (i + 1) % args.accum_steps == 0
        no_sync = model.no_sync() if args.distributed and not sync else nullcontext()
        with no_sync, autocast(args.amp, args.device):
            loss = criterion(model(images), targets)
        loss_value = watch.check(loss, f'epoch {epoch} step {i // args.accum_steps + 1}/{steps_per_epoch}')
        scaler.scale(loss / args.accum_steps).backward()
        loss_sum += loss_value * images.shape[0]
        seen += images.shape[0]
        if not sync:
            continue
        if args.clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if scheduler is not None:
            scheduler.step_update(step)  # a no-op for the per-epoch schedule
        if ema is not None:
            ema.update(getattr(model, 'module', model), step=step)
        done = (i + 1) // args.accum_steps
        # Every --log-interval steps, and at least every 30 s (a CPU or a first compiled step is slow).
        if is_main_process() and (done % args.log_interval == 0 or done == steps_per_epoch
                                  or time.time() - last_log > 30):
            last_log = time.time()
            elapsed = time.time() - start
            eta = datetime.timedelta(seconds=int(elapsed / done * (steps_per_epoch - done)))
            _logger.info('Epoch %d [%d/%d] eta %s loss %.4f lr %.3e %.1f img/s', epoch, done, steps_per_epoch,
                         eta, loss_sum / seen, current_lr(optimizer), seen * args.world_size / elapsed)
    loss_avg = all_reduce_sum([loss_sum, seen], args.device)
    return {'loss': loss_avg[0] / max(loss_avg[1], 1), 'lr': current_lr(optimizer), 'step': step}


@torch.no_grad()
def evaluate(args, model, loader) -> Dict:
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    loss_sum = top1 = top5 = count = skipped = 0.0
    for images, targets, left_out in loader:
        skipped += left_out
        if images is None:
            continue
        images, targets = images.to(args.device), targets.to(args.device)
        with autocast(args.amp, args.device):
            logits = model(images)
        loss_sum += criterion(logits.float(), targets).item()
        acc1, acc5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
        top1 += acc1.item() * images.shape[0] / 100
        top5 += acc5.item() * images.shape[0] / 100
        count += images.shape[0]
    loss_sum, top1, top5, count, skipped = all_reduce_sum([loss_sum, top1, top5, count, skipped], args.device)
    if not count:
        raise InvalidInputError(f'no readable validation image ({int(skipped)} unreadable) under {args.data_path}/val')
    metrics = {'acc1': 100 * top1 / count, 'acc5': 100 * top5 / count, 'loss': loss_sum / count, 'images': int(count),
               'unreadable_images': int(skipped)}
    note = f' ({int(count)} images; {int(skipped)} unreadable left out)' if skipped else f' ({int(count)} images)'
    _logger.info('* Acc@1 %.3f Acc@5 %.3f loss %.3f%s', metrics['acc1'], metrics['acc5'], metrics['loss'], note)
    return metrics


def measure_throughput(args, model) -> Dict:
    """Forward images/s on random data (after warm-up) and peak memory."""
    model.eval()
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=args.device)
    cuda = args.device.startswith('cuda')
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), autocast(args.amp, args.device):
        for _ in range(5):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        start, iters = time.perf_counter(), 20
        for _ in range(iters):
            model(x)
        if cuda:
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {'images_per_s': iters * args.batch_size / elapsed, 'peak_memory_gib': peak / 2 ** 30,
              'batch_size': args.batch_size, 'amp': args.amp, 'device': args.device}
    _logger.info('throughput %.1f images/s, peak memory %.2f GiB (%s), batch %d, amp %s', result['images_per_s'],
                 result['peak_memory_gib'], 'GPU' if cuda else 'process RSS', args.batch_size, args.amp)
    return result


# ---------------------------------------------------------------------------- main


def setup(args) -> None:
    """Processes (torchrun / SLURM: sets args.distributed, rank, world_size, local_rank, device), logging,
    seeds and cuDNN."""
    init_distributed_device(args)
    setup_logging(_logger.name)
    seed_everything(args.seed + args.rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest conv kernels


def compiled(args, module: nn.Module) -> nn.Module:
    if not args.compile:
        return module
    _logger.info('torch.compile (%s): the first steps compile the model and take a while', args.compile)
    return torch.compile(module, backend=args.compile)


def build_model(args, classes: Optional[List[str]]) -> nn.Module:
    """The model for the data's ``classes`` (ImageNet's 1000 without data), from ``--pretrained`` if given: a
    checkpoint trained on other classes gets a new classifier, with a warning naming them."""
    num_classes = len(classes) if classes is not None else 1000
    model = timm.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
    if args.pretrained:
        pretrained = read_checkpoint(args.pretrained)
        load_backbone_weights(model, args.pretrained, checkpoint=pretrained, head='reset')
        names = label_names(pretrained)
        if names is not None and classes is not None and names != list(classes):
            _logger.warning('%s was trained on other classes (%s): new classifier for the data\'s %d classes',
                            args.pretrained, first_few(names), num_classes)
            model.reset_classifier(num_classes)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    mpvit.set_batch_paths(model, args.batch_paths)
    model.to(args.device)
    _logger.info('%s: %.2fM parameters, %d classes', args.model, count_parameters(model) / 1e6, num_classes)
    return model


def run_throughput(args, output_dir: Path) -> Dict:
    result = measure_throughput(args, compiled(args, build_model(args, None)))
    if is_main_process():
        (output_dir / 'throughput.json').write_text(json.dumps(result, indent=2))
    return result


def run_eval(args, model: nn.Module, dataset_val: CheckedImageFolder, output_dir: Path) -> Dict:
    """Evaluate ``--resume`` (or the ``--pretrained`` / fresh model) and write ``eval_metrics.json``."""
    if args.resume:
        state = read_checkpoint(args.resume)
        check_class_names(state, dataset_val.classes, args.resume)
        load_backbone_weights(model, args.resume, head='require', checkpoint=state)
    metrics = evaluate(args, compiled(args, model), build_val_loader(args, dataset_val))
    if is_main_process():
        eval_results.write_eval_metrics(output_dir / 'eval_metrics.json', 'classification', metrics,
                                        config=args.config, model=args.model,
                                        dataset=dataset_record(args, dataset_val, metrics['images']))
    return metrics


def build_train_data(args, val_classes: List[str]) -> Tuple[CheckedImageFolder, DataLoader]:
    """The training set (same classes as val/, some images readable) and its loader (one full batch at least)."""
    dataset = build_dataset(args, 'train')
    if dataset.classes != val_classes:
        only_train = sorted(set(dataset.classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(dataset.classes))
        raise InvalidInputError(f'train and val classes differ under {args.data_path}: only in train/ '
                                f'[{first_few(only_train)}], only in val/ [{first_few(only_val)}]'
                                + ('' if only_train or only_val else ' (same names, other order)'))
    check_some_readable((path for path, _ in dataset.samples), f'{args.data_path}/train')
    loader = build_train_loader(args, dataset)
    if len(loader) < args.accum_steps:
        raise InvalidInputError(f'{args.data_path}/train has {len(dataset)} images: not one full batch of '
                                f'{args.batch_size} x {args.accum_steps} accumulation steps per process')
    return dataset, loader


def build_criterion(args, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """Mixup / CutMix with soft-target cross-entropy, or label smoothing, or plain cross-entropy (DeiT)."""
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise InvalidInputError(f'mixup / cutmix pair images within a batch: --batch-size {args.batch_size} '
                                    'must be even')
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(args.smoothing)
    return None, nn.CrossEntropyLoss()


@dataclass
class Training:
    """What the epochs of a run share: built once by :func:`prepare_training`, advanced by :func:`run_epoch`."""
    model: nn.Module  # the plain model (its state is saved)
    train_model: nn.Module  # DDP and / or compiled
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    train_loader: DataLoader
    val_loader: DataLoader
    classes: List[str]
    num_epochs: int
    start_epoch: int = 0
    step: int = 0
    best: float = 0.0
    log: List[Dict] = field(default_factory=list)


def prepare_training(args, model: nn.Module, dataset_val: CheckedImageFolder) -> Training:
    """Data, lr (DeiT's 5e-4 x total batch / 512 unless given), optimizer, schedule, scaler and loss."""
    dataset_train, train_loader = build_train_data(args, dataset_val.classes)
    total_batch = args.batch_size * args.accum_steps * args.world_size
    if args.lr is None:
        args.lr = 5e-4 * total_batch / 512
    optimizer = build_optimizer(args, model)
    steps_per_epoch = len(train_loader) // args.accum_steps
    scheduler, num_epochs = build_scheduler(args, optimizer, min(steps_per_epoch, args.max_steps or steps_per_epoch))
    _logger.info('lr %.3g (total batch %d)%s; %s', args.lr, total_batch,
                 f', layer decay {args.layer_decay}' if args.layer_decay else '',
                 f'{args.warmup_steps} warm-up steps' if args.warmup_steps is not None
                 else f'{args.warmup_epochs} warm-up epochs')
    mixup, criterion = build_criterion(args, len(dataset_train.classes))
    return Training(model=model, train_model=model, eval_model=model, optimizer=optimizer, scheduler=scheduler,
                    scaler=torch.amp.GradScaler(enabled=args.amp == 'fp16'), criterion=criterion, mixup=mixup,
                    ema=None, train_loader=train_loader, val_loader=build_val_loader(args, dataset_val),
                    classes=dataset_train.classes, num_epochs=num_epochs)


def resume_training(args, run: Training, resume: str, output_dir: Path) -> Optional[Dict]:
    """Continue ``resume`` (a training checkpoint of this script for the same classes and schedule): weights,
    training state and log rows. Returns its EMA weights, if any (the EMA is built later)."""
    if not resume:
        return None
    state = read_checkpoint(resume)
    if not (isinstance(state, dict) and 'optimizer' in state):
        raise InvalidInputError(f'{resume} is not a training checkpoint of this script '
                                '(use --pretrained for weights)')
    check_class_names(state, run.classes, resume)
    load_backbone_weights(run.model, resume, checkpoint=state['model'], head='require')
    check_same_schedule(state, args, resume)
    resumed = restore_training_state(state, resume, run.optimizer, run.scheduler, run.scaler, output_dir / LOG_FILE)
    run.start_epoch, run.step, run.log = resumed
    run.best = state.get('best_acc1', 0.0)
    _logger.info('resumed from %s at epoch %d', resume, run.start_epoch)
    return state.get('model_ema')


def wrap_models(args, run: Training, ema_state: Optional[Dict]) -> None:
    """EMA (restored from a resumed checkpoint's), DDP and ``--compile`` around the plain model."""
    if args.model_ema:
        run.ema = ModelEmaV3(run.model, decay=args.model_ema_decay)
        if ema_state is not None:
            check_usable(ema_state, run.ema.module, "the resumed checkpoint's model_ema")
            run.ema.module.load_state_dict(ema_state)
    train_model = run.model
    if args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            align_gradient_strides(run.model), device_ids=[args.local_rank] if args.device.startswith('cuda') else None)
    run.train_model, run.eval_model = compiled(args, train_model), compiled(args, run.model)


def run_epoch(args, run: Training, epoch: int, watch: LossWatch, output_dir: Path) -> Dict:
    """Train one epoch, step the schedule, evaluate (and the EMA), then the checkpoint and the log."""
    if hasattr(run.train_loader.sampler, 'set_epoch'):
        run.train_loader.sampler.set_epoch(epoch)
    train_stats = train_one_epoch(args, run.train_model, run.train_loader, run.criterion, run.optimizer,
                                  run.scaler, run.mixup, epoch, run.step, run.ema, watch, run.scheduler)
    run.step = train_stats.pop('step')
    run.scheduler.step(epoch)  # as the authors (DeiT): the next epoch trains at the schedule's value for this one
    metrics = evaluate(args, run.eval_model, run.val_loader)
    run.best = max(run.best, metrics['acc1'])
    if run.ema is not None:
        _logger.info('EMA model:')
        metrics['ema_acc1'] = evaluate(args, run.ema.module, run.val_loader)['acc1']
    run.log.append(epoch_row(epoch, train_stats, metrics, step=run.step))
    extra = {'best_acc1': run.best, 'pretrained_cfg': pretrained_cfg(args, run.classes)}
    if run.ema is not None:
        extra['model_ema'] = run.ema.module.state_dict()
    # The checkpoint carries the log's rows: log.txt is rewritten from them, here and on resume.
    save_training_checkpoint(output_dir / 'checkpoint.pth', run.model, run.optimizer, run.scheduler, run.scaler,
                             epoch=epoch, step=run.step, args=args, log=run.log, watch=watch, extra=extra)
    if is_main_process():
        write_log(output_dir / LOG_FILE, run.log)
    _logger.info('epoch %d: val Acc@1 %.2f (best %.2f)', epoch, metrics['acc1'], run.best)
    return metrics


def train(args, model: nn.Module, dataset_val: CheckedImageFolder, resume: str, output_dir: Path) -> Dict:
    run = prepare_training(args, model, dataset_val)
    wrap_models(args, run, resume_training(args, run, resume, output_dir))
    last_epoch = run.num_epochs if args.run_epochs is None else min(run.num_epochs, run.start_epoch + args.run_epochs)
    metrics: Dict = {}
    watch = LossWatch()
    for epoch in range(run.start_epoch, last_epoch):
        metrics = run_epoch(args, run, epoch, watch, output_dir)
    return dict(metrics, best_acc1=run.best)


def main(args: argparse.Namespace) -> Dict:
    output_dir = ensure_writable_dir(args.output_dir)
    resume = args.resume
    if args.auto_resume and not args.eval and (output_dir / 'checkpoint.pth').is_file():
        resume = str(output_dir / 'checkpoint.pth')
    for weights in (resume, args.pretrained):  # find / download and check (no code in it) before any work
        if weights:
            local_checkpoint(weights)
    setup(args)
    try:
        if args.throughput:
            return run_throughput(args, output_dir)
        check_data(args)
        dataset_val = build_dataset(args, 'val')
        model = build_model(args, dataset_val.classes)
        if args.eval:
            return run_eval(args, model, dataset_val, output_dir)
        return train(args, model, dataset_val, resume, output_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    with user_errors_in_one_line():
        main(parse_args())
