"""Evaluate a segmentation checkpoint (file or URL) with mmengine's Runner; prints the mIoU table.

    python semantic_segmentation/tools/test.py CONFIG CHECKPOINT [--show-dir vis/]
    python semantic_segmentation/tools/test.py CONFIG released     # the authors' checkpoint of CONFIG
"""
from __future__ import annotations

import mpvit.quiet  # noqa: F401  (first: known dependency warnings off in this command)

import argparse
import logging
import os
import os.path as osp

from mmengine.config import DictAction
from mmengine.dist import is_main_process
from mmengine.logging import print_log
from mmengine.runner import Runner

from mpvit import eval_results, model_zoo
from mpvit.checkpoint import local_checkpoint, read_checkpoint
from mpvit.errors import MissingFileError
from mpvit.mmseg import load_segmentor_weights
from mpvit.mmseg.run_config import check_loader_data, eval_dataset_record, load_run_config
from mpvit.training import ensure_writable_dir, user_errors_in_one_line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a segmentor')
    parser.add_argument('config')
    parser.add_argument('checkpoint', help=f"file, URL, or '{model_zoo.RELEASED}' (the authors' weights of CONFIG)")
    parser.add_argument('--work-dir')
    parser.add_argument('--show-dir', help='write prediction overlays (PNG) into this folder')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def warn_other_class_names(checkpoint: dict, metainfo: dict, what: str) -> None:
    """The head fits (same count), but a checkpoint trained on other class names is scored under the data's."""
    meta = checkpoint.get('meta') or {}
    trained = (meta.get('dataset_meta') or {}).get('classes') or meta.get('CLASSES')
    classes = metainfo.get('classes')
    if trained and classes and tuple(trained) != tuple(classes):
        print_log(f'{what} was trained on the classes {", ".join(map(str, trained))}; the test data names them '
                  f'{", ".join(map(str, classes))} (the table uses the latter)', logger='current',
                  level=logging.WARNING)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    data_root = cfg.test_dataloader.dataset.get('data_root')
    if data_root and not osp.isdir(data_root):
        raise MissingFileError(f'dataset root not found: {data_root} (see semantic_segmentation/README.md)')
    check_loader_data(cfg, ('test_dataloader',))  # before a checkpoint is downloaded or read
    weights = local_checkpoint(model_zoo.resolve(args.checkpoint, args.config))
    checkpoint = read_checkpoint(weights)
    # The weights are loaded here, strictly (load_segmentor_weights), not by the Runner (load_from), which
    # would read the file again and load it non-strictly. The backbone's ImageNet init is pointless before
    # loading a whole segmentor.
    cfg.load_from, cfg.resume = None, False
    cfg.model.backbone.pop('init_cfg', None)
    if args.show_dir:
        cfg.default_hooks.visualization = dict(type='SegVisualizationHook', draw=True, interval=1)
        cfg.visualizer.save_dir = args.show_dir
        # The visualizer is a named singleton: a fixed name would reuse an earlier one (and its save_dir)
        # in the same process; unnamed, the Runner names it after its timestamped experiment.
        cfg.visualizer.pop('name', None)
    ensure_writable_dir(cfg.work_dir, 'work directory')
    runner = Runner.from_cfg(cfg)
    load_segmentor_weights(getattr(runner.model, 'module', runner.model), weights, checkpoint=checkpoint)
    print_log(f'loaded the segmentor weights of {weights}', logger='current')
    warn_other_class_names(checkpoint, runner.test_dataloader.dataset.metainfo, weights)
    metrics = runner.test()
    if is_main_process():
        dataset = runner.test_dataloader.dataset
        built = getattr(getattr(runner.model, 'module', runner.model).backbone, 'model_name', None)  # what ran
        eval_results.write_eval_metrics(osp.join(cfg.work_dir, 'eval_metrics.json'), 'mmseg', metrics,
                                     config=args.config, model=built if isinstance(built, str) else None,
                                     dataset=eval_dataset_record(dataset))
    return metrics


if __name__ == '__main__':
    with user_errors_in_one_line():
        main()
