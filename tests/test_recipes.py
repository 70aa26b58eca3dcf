"""The authors' training and evaluation recipes, as our configs and drivers resolve them.

Each value below is a fact of the authors' code (youngwanLEE/MPViT @ e2d86e6: their Detectron2 YAMLs and
dataset mapper, their DeiT-based training script and dataset builder, the mmseg 0.x UperNet configs, and the original
Deformable DETR ``main.py`` / ``deformable_transformer.py``), checked through the same loading path a user's run takes.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, free_port, load_script
from torchvision import transforms as tv

D2_CONFIGS = sorted((REPO / 'configs' / 'detectron2').glob('*.yaml'))


# ------------------------------------------------------------------------------------------ Detectron2

def _d2_cfg(path: Path):
    pytest.importorskip('detectron2')
    from detectron2.config import get_cfg

    from mpvit.d2 import add_mpvit_config

    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


@pytest.mark.parametrize('config', [p for p in D2_CONFIGS if p.name.endswith('_1x.yaml')], ids=lambda p: p.stem)
def test_d2_1x_trains_at_a_single_scale(config):
    cfg = _d2_cfg(config)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert not cfg.AUG.DETR and not cfg.INPUT.CROP.ENABLED
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == ((60000, 80000), 90000)


@pytest.mark.parametrize('config', D2_CONFIGS, ids=lambda p: p.stem)
def test_d2_keeps_images_without_annotations(config):
    assert _d2_cfg(config).DATALOADER.FILTER_EMPTY_ANNOTATIONS is False


@pytest.mark.parametrize('config', [p for p in D2_CONFIGS if p.name.endswith('_ms_3x.yaml')], ids=lambda p: p.stem)
def test_d2_ms_3x_crop_clips_boxes_like_the_authors(config):
    from mpvit.d2 import build_train_mapper

    cfg = _d2_cfg(config)
    assert cfg.AUG.DETR and cfg.INPUT.CROP.ENABLED and tuple(cfg.INPUT.CROP.SIZE) == (384, 600)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == ((210000, 250000), 270000)
    mapper = build_train_mapper(cfg).mapper  # inside SkipUnreadable
    assert mapper.recompute_boxes is False  # boxes clipped to the crop, not recomputed from masks
    cfg.AUG.RECOMPUTE_BOXES = True
    assert build_train_mapper(cfg).mapper.recompute_boxes is bool(cfg.MODEL.MASK_ON)


# -------------------------------------------------------------------------------------- classification

@pytest.fixture(scope='module')
def cls_main():
    return load_script('classification/main.py')


@pytest.mark.parametrize('variant', ['tiny', 'xsmall', 'small', 'base'])
def test_classification_evaluates_at_crop_pct_0875(cls_main, variant, tmp_path):
    from mpvit.demo_data import write_shapes_imagefolder
    data = write_shapes_imagefolder(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, size=32)
    args = cls_main.parse_args(['-c', str(REPO / f'configs/classification/mpvit_{variant}.yaml'),
                                '--data-path', str(data)])
    ops = cls_main.build_dataset(args, 'val').transform.transforms
    resize = next(t for t in ops if isinstance(t, tv.Resize))
    crop = next(t for t in ops if isinstance(t, tv.CenterCrop))
    assert (resize.size, resize.interpolation, crop.size) == (256, tv.InterpolationMode.BICUBIC, (224, 224))
    # The model's pretrained_cfg gives timm users the same evaluation transform.
    import timm
    cfg = timm.data.resolve_data_config({}, model=timm.create_model(f'mpvit_{variant}', pretrained=False))
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['input_size']) == (0.875, 'bicubic', (3, 224, 224))
    assert cls_main.parse_args(['--data-path', str(data)]).crop_pct == 0.875


def _deit_lr(epoch: int, base: float, warmup_lr: float = 1e-6, min_lr: float = 1e-5, warmup: int = 5,
             epochs: int = 300) -> float:
    """The learning rate the authors' main.py trains epoch ``epoch`` with: ``lr_scheduler.step(e)`` runs after
    epoch e, so epoch e >= 1 uses the schedule's value at e - 1 (timm's cosine, warm-up not a prefix)."""
    t = max(epoch - 1, 0)
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def test_classification_lr_is_stepped_per_epoch_like_the_authors(cls_main, monkeypatch):
    args = cls_main.parse_args(['-c', str(REPO / 'configs/classification/mpvit_small.yaml')])
    args.lr = 5e-4 * 1024 / 512  # the authors' 8 x 128 images
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler, num_epochs = cls_main.build_scheduler(args, optimizer)
    assert num_epochs == 300
    seen = []
    for epoch in range(num_epochs):
        seen.append(optimizer.param_groups[0]['lr'])
        for _ in range(3):  # iterations inside an epoch leave it alone
            optimizer.step()
        assert optimizer.param_groups[0]['lr'] == seen[-1]
        scheduler.step(epoch)
    expected = [_deit_lr(e, args.lr) for e in range(300)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[:3] == pytest.approx([1e-6, 1e-6, 1e-6 + (1e-3 - 1e-6) / 5])


def test_classification_driver_keeps_the_lr_through_each_epoch(cls_main, tmp_path):
    """End to end: log.txt's lr is the epoch's lr (nothing inside an epoch changes it)."""
    from mpvit.demo_data import write_shapes_imagefolder
    from mpvit.training import read_log
    data = write_shapes_imagefolder(tmp_path / 'data', num_classes=2, train_per_class=4, val_per_class=1, size=32)
    argv = ['--model', 'mpvit_tiny', '--input-size', '32', '--batch-size', '2', '--num-workers', '0', '--amp', 'none',
            '--epochs', '4', '--warmup-epochs', '2', '--lr', '1e-3', '--max-steps', '2', '--no-repeated-aug',
            '--data-path', str(data), '--output-dir', str(tmp_path / 'out')]
    cls_main.main(cls_main.parse_args(argv))
    lrs = [row['train_lr'] for row in read_log(tmp_path / 'out' / 'log.txt', up_to_epoch=3)]
    assert lrs == pytest.approx([_deit_lr(e, 1e-3, warmup=2, epochs=4) for e in range(4)], rel=1e-9)


# ------------------------------------------------------------------------------------------ mmsegmentation

def _mmseg_cfg(variant: str = 'small'):
    pytest.importorskip('mmseg')
    from mmengine.config import Config

    return Config.fromfile(str(REPO / f'configs/semantic_segmentation/upernet_mpvit_{variant}_160k_ade20k.py'))


def _mmseg_lr(i: int) -> float:
    """mmseg 0.x ``poly`` (power 1, min_lr 0, max_iters 160k) times ``linear`` warm-up (ratio 1e-6, 1500 iters)."""
    regular = 6e-5 * (1 - i / 160000) ** 1.0
    if i < 1500:
        return regular * (1 - (1 - i / 1500) * (1 - 1e-6))
    return regular


def test_mmseg_lr_is_the_authors_poly_with_warmup():
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = _mmseg_cfg()
    assert cfg.train_cfg.max_iters == 160000
    optimizer = build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper).optimizer
    schedulers = [PARAM_SCHEDULERS.build(dict(c, optimizer=optimizer)) for c in cfg.param_scheduler]
    checks = {0, 750, 1499, 1500, 80000, 159999}
    seen = {}
    optimizer.step()  # as in training, an optimizer step comes first (no gradients here: nothing changes)
    for i in range(cfg.train_cfg.max_iters):
        if i in checks:
            seen[i] = optimizer.param_groups[0]['lr']
        for scheduler in schedulers:
            scheduler.step()
    assert seen == pytest.approx({i: _mmseg_lr(i) for i in checks}, rel=1e-9)


@pytest.mark.parametrize('variant', ['small', 'base'])
def test_mmseg_weight_decay_on_every_parameter(variant):
    from mmengine.optim import build_optim_wrapper
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    import mpvit.mmseg  # noqa: F401
    register_all_modules()
    cfg = _mmseg_cfg(variant)
    cfg.model.backbone.pop('init_cfg')
    cfg.model.backbone.norm_layer = dict(type='BN', requires_grad=True)
    for part in ('decode_head', 'auxiliary_head'):
        cfg.model[part].norm_cfg = dict(type='BN', requires_grad=True)
    model = MODELS.build(cfg.model)
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    assert type(optimizer).__name__ == 'AdamW'
    params = [p for group in optimizer.param_groups for p in group['params']]
    assert {group['weight_decay'] for group in optimizer.param_groups} == {0.01}
    assert {group['lr'] for group in optimizer.param_groups} == {6e-5}
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))  # shared ones once


# ------------------------------------------------------------------------------------------ Deformable DETR

@pytest.fixture(scope='module')
def ddetr_main():
    pytest.importorskip('transformers')
    return load_script('deformable_detr/main.py')


@pytest.mark.parametrize('variant', ['tiny', 'xsmall', 'small', 'base'])
def test_ddetr_backbone_has_no_drop_path(ddetr_main, variant):
    args = ddetr_main.get_args(['-c', str(REPO / f'configs/deformable_detr/mpvit_{variant}.yaml')])
    assert args.drop_path == 0.0
    assert ddetr_main.get_args([]).drop_path == 0.0


def test_ddetr_dropout_and_query_init_like_the_original(ddetr_main):
    from mpvit.deformable_detr import build_deformable_detr

    args = ddetr_main.get_args(['-c', str(REPO / 'configs/deformable_detr/mpvit_small.yaml')])
    torch.manual_seed(0)
    model = build_deformable_detr(args.backbone, args.num_classes, args.num_queries, args.num_feature_levels,
                                  args.drop_path)
    detr = model.model
    assert detr.encoder.dropout == 0.0  # nothing on the encoder's input
    for layer in detr.encoder.layers:
        assert layer.dropout == 0.1 and layer.mlp.activation_dropout == 0.1 and layer.mlp.dropout == 0.1
    for layer in detr.decoder.layers:
        assert layer.dropout == 0.1 and layer.mlp.activation_dropout == 0.1 and layer.mlp.dropout == 0.1
        assert layer.self_attn.attention_dropout == 0.1  # nn.MultiheadAttention(dropout=0.1) in the original
    drop_paths = [m for m in detr.backbone.model.modules() if type(m).__name__ == 'DropPath']
    assert all(m.drop_prob == 0.0 for m in drop_paths)
    query = detr.query_position_embeddings.weight
    assert query.shape == (300, 512)
    assert 0.97 < query.std().item() < 1.03 and abs(query.mean().item()) < 0.01  # N(0, 1), not N(0, 0.02)


def _box_normaliser_worker(rank: int, world: int, port: int, results) -> None:
    import torch.distributed as dist
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher, DeformableDetrImageLoss

    from mpvit.deformable_detr import global_box_normaliser, weighted_loss
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        counts = [1, 6][rank]  # ranks see different numbers of boxes
        targets = [dict(class_labels=torch.randint(0, 5, (counts,)), boxes=torch.rand(counts, 4) * 0.4 + 0.2)]
        outputs = dict(logits=torch.randn(1, 10, 5), pred_boxes=torch.rand(1, 10, 4) * 0.4 + 0.2)
        criterion = DeformableDetrImageLoss(DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2),
                                            num_classes=5, focal_alpha=0.25, losses=['labels', 'boxes'])
        ours = weighted_loss(criterion(outputs, targets)) * global_box_normaliser(targets, torch.device('cpu'))
        # The original: boxes of all ranks, averaged over the world size.
        indices = criterion.matcher(outputs, targets)
        num_boxes = (1 + 6) / world
        original = {}
        for name in ('labels', 'boxes'):
            original.update(criterion.get_loss(name, outputs, targets, indices, num_boxes))
        results[rank] = (ours.item(), weighted_loss(original).item())
    finally:
        dist.destroy_process_group()


def test_ddetr_loss_normalises_by_the_boxes_of_all_ranks():
    pytest.importorskip('transformers')
    results = mp.Manager().dict()
    mp.spawn(_box_normaliser_worker, args=(2, free_port(), results), nprocs=2)
    for rank in range(2):
        ours, original = results[rank]
        assert ours == pytest.approx(original, rel=1e-6)
    # Without the all-reduce the rank with one box would weigh its loss 3.5x higher.
    assert results[0][0] != pytest.approx(results[0][1] * 3.5, rel=1e-3)
