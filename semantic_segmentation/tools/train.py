"""Train a segmentor with mmengine's Runner (mmseg's own train tool, for this repository's configs).

    python semantic_segmentation/tools/train.py configs/semantic_segmentation/upernet_mpvit_small_160k_ade20k.py
    bash semantic_segmentation/tools/dist_train.sh CONFIG 8
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.runner import Runner
from mmengine.runner.checkpoint import find_latest_checkpoint

from mpvit.checkpoint import local_checkpoint
from mpvit.errors import MissingFileError
from mpvit.mmseg.run_config import check_loader_data, load_run_config
from mpvit.training import ensure_writable_dir, user_errors_in_one_line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: work_dirs/<config name>)')
    parser.add_argument('--resume', action='store_true', help='resume from the latest checkpoint in work-dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys, a.b=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def build_config(args: argparse.Namespace) -> Config:
    cfg = load_run_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    cfg.resume = args.resume
    data_root = cfg.train_dataloader.dataset.get('data_root')
    if data_root and not osp.isdir(data_root):
        raise MissingFileError(f'dataset root not found: {data_root} (see semantic_segmentation/README.md)')
    check_loader_data(cfg, ('train_dataloader', 'val_dataloader'))  # validation is scored during training
    ensure_writable_dir(cfg.work_dir, 'work directory')
    # Find / download and check (no code in it) every file the Runner will read, before it builds anything:
    # the backbone's init_cfg (mmengine initialises before it loads), load_from, and when resuming without
    # load_from, the work dir's latest checkpoint (mmengine's choice).
    init_cfg = cfg.model.backbone.get('init_cfg') or {}
    if init_cfg.get('type') == 'Pretrained' and init_cfg.get('checkpoint'):
        local_checkpoint(init_cfg['checkpoint'])
    if cfg.get('load_from'):
        cfg.load_from = local_checkpoint(cfg.load_from)
    elif cfg.resume and find_latest_checkpoint(cfg.work_dir):
        local_checkpoint(find_latest_checkpoint(cfg.work_dir))
    return cfg


def main(argv=None) -> Runner:
    runner = Runner.from_cfg(build_config(parse_args(argv)))
    runner.train()
    return runner


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
