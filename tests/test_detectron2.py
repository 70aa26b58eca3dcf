"""MPViT on Detectron2: README configs, fidelity, released checkpoints, errors, and train/eval end to end (CPU)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from fidelity import compare, golden, synth_input, synth_state_dict
from helpers import assert_scores, load_script

pytest.importorskip('detectron2')
import timm  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.data.transforms import CropTransform  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from mpvit import CheckpointError  # noqa: E402
from mpvit.d2 import MPViTCheckpointer, add_mpvit_config, build_detr_augmentation, build_optimizer  # noqa: E402
from mpvit.demo_data import write_shapes_coco  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs' / 'detectron2'
VARIANTS = ('tiny', 'xsmall', 'small', 'base')
PARAMS = {  # the reference implementation's trainable parameters, as its run recorded them
    'retinanet': dict(zip(VARIANTS, (15_104_612, 19_911_060, 32_294_268, 84_635_428))),
    'mask_rcnn': dict(zip(VARIANTS, (25_712_224, 30_434_704, 42_744_184, 94_667_552))),
}


def _cfg(name: str, *opts):
    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', *opts])
    return cfg


def _params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def test_compat_patch_fails_loudly_on_other_sources(tmp_path):
    patch = load_script('dev/patch_detectron2.py')
    transform = tmp_path / 'detectron2' / 'data' / 'transforms' / 'transform.py'
    transform.parent.mkdir(parents=True)
    (tmp_path / 'detectron2' / '__init__.py').write_text('')
    transform.write_text('interp = Image.BILINEAR\n')  # already changed: refuse rather than half-patch
    with pytest.raises(SystemExit, match=r'transform.py: expected 1 match'):
        patch.patch_tree(tmp_path)
    transform.write_text('interp = Image.LINEAR\n')
    with pytest.raises(SystemExit, match='model_zoo.py is missing'):
        patch.patch_tree(tmp_path)
    assert transform.read_text() == 'interp = Image.LINEAR\n'  # nothing written before every check passed


UPSTREAM_MODEL_ZOO = """import os
import pkg_resources


def get_config_file(config_path):
    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )
    return cfg_file
"""
UPSTREAM_SETUP = """setup(
    name="detectron2",
    install_requires=[
        "Pillow>=7.1",  # or use pillow-simd
        "pycocotools>=2.0.2",
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "fvcore>=0.1.5,<0.1.6",  # required like this
        "iopath>=0.1.7,<0.1.10",
        "dataclasses; python_version<'3.7'",
        "omegaconf>=2.1,<2.4",
        "hydra-core>=1.1",
        "black",
    ],
)
"""


def _fake_upstream_tree(root: Path, model_zoo: str = UPSTREAM_MODEL_ZOO) -> Path:
    """The few files of upstream Detectron2 that the --upstream patch touches (upstream itself is not
    reachable in CI); upstream already uses Image.BILINEAR, so that file must be left alone."""
    (root / 'detectron2' / 'model_zoo').mkdir(parents=True)
    (root / 'detectron2' / 'data' / 'transforms').mkdir(parents=True)
    (root / 'detectron2' / '__init__.py').write_text('__version__ = "0.6"\n')
    (root / 'detectron2' / 'model_zoo' / 'model_zoo.py').write_text(model_zoo)
    (root / 'detectron2' / 'data' / 'transforms' / 'transform.py').write_text('interp = Image.BILINEAR\n')
    (root / 'setup.py').write_text(UPSTREAM_SETUP)
    return root


def test_upstream_route_patch_on_a_fake_tree(tmp_path):
    patch = load_script('dev/patch_detectron2.py')
    root = _fake_upstream_tree(tmp_path / 'upstream')
    patch.patch_tree(root, upstream=True)
    model_zoo = (root / 'detectron2' / 'model_zoo' / 'model_zoo.py').read_text()
    assert 'pkg_resources' not in model_zoo
    namespace = {'__file__': str(root / 'detectron2' / 'model_zoo' / 'model_zoo.py')}
    exec(model_zoo, namespace)  # runs without pkg_resources and finds the packaged configs
    assert namespace['get_config_file']('a.yaml') == str(root / 'detectron2' / 'model_zoo' / 'configs' / 'a.yaml')
    setup_py = (root / 'setup.py').read_text()
    for unpinned in ('"Pillow",', '"fvcore",', '"iopath",', '"omegaconf",', '"yacs",'):
        assert unpinned in setup_py
    for dropped in ('hydra-core', 'black', 'dataclasses', '<0.1.10', '<2.4'):
        assert dropped not in setup_py
    assert (root / 'detectron2' / 'data' / 'transforms' / 'transform.py').read_text() == 'interp = Image.BILINEAR\n'
    # A tree that no longer imports pkg_resources only gets the requirements change.
    fixed = _fake_upstream_tree(tmp_path / 'fixed', model_zoo='import os\n')
    assert [line.split(':')[0] for line in patch.patch_tree(fixed, upstream=True)] == ['setup.py']
    assert (fixed / 'detectron2' / 'model_zoo' / 'model_zoo.py').read_text() == 'import os\n'


def test_install_refuses_a_second_detectron2(tmp_path):
    """DETECTRON2_SOURCE while the patched sdist is installed: refused before anything is built or copied."""
    import importlib.metadata

    try:
        importlib.metadata.version('pb1-detectron2')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('Detectron2 here was not installed from the sdist')
    run = subprocess.run(['bash', str(REPO / 'dev' / 'install_detectron2.sh')], capture_output=True, text=True,
                         env={**os.environ, 'DETECTRON2_SOURCE': str(_fake_upstream_tree(tmp_path / 'src')),
                              'PYTHON': sys.executable})
    assert run.returncode == 1
    assert 'pb1-detectron2==0.6 (the patched sdist) is installed; to switch, uninstall it first' in run.stderr


def test_readme_configs_exist():
    expected = {f'{d}_mpvit_{v}_{s}.yaml' for d in PARAMS for v in VARIANTS for s in ('1x', 'ms_3x')}
    expected |= {f'cascade_mask_rcnn_mpvit_{v}_ms_3x.yaml' for v in ('small', 'base')}
    assert expected <= {p.name for p in CONFIGS.glob('*.yaml')}


@pytest.mark.parametrize('detector', sorted(PARAMS))
@pytest.mark.parametrize('variant', VARIANTS)
def test_released_layout_and_parameter_count(detector, variant):
    manifest = golden(f'manifest_d2_{detector}_mpvit_{variant}.json')
    for schedule in ('1x', 'ms_3x'):
        cfg = _cfg(f'{detector}_mpvit_{variant}_{schedule}.yaml')
        assert cfg.MODEL.MPVIT.NORM == 'SyncBN' and cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.IMS_PER_BATCH == 16
        assert cfg.AUG.DETR == (schedule == 'ms_3x')
        assert cfg.SOLVER.MAX_ITER == (90_000 if schedule == '1x' else 270_000)
        model = build_model(cfg)
        assert _params(model) == PARAMS[detector][variant] == manifest['params_trainable']
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest['tensors']


@pytest.mark.parametrize('variant,drop_path', [('small', 0.2), ('base', 0.5)])
def test_cascade_configs_build(variant, drop_path):
    cfg = _cfg(f'cascade_mask_rcnn_mpvit_{variant}_ms_3x.yaml')
    assert cfg.MODEL.MPVIT.DROP_PATH == drop_path
    model = build_model(cfg)
    assert type(model.roi_heads).__name__ == 'CascadeROIHeads' and len(model.roi_heads.box_predictor) == 3


def test_weights_that_are_none_are_refused_in_the_heads_too(tmp_path):
    """MODEL.WEIGHTS / --resume / --eval-only: NaN, integer and meta tensors used to load (cast, or a torch
    traceback) and give an AP of NaN weights."""
    model = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml'))
    state = model.state_dict()
    for key in ('head.cls_score.weight', 'backbone.bottom_up.backbone.stem.0.conv.weight'):
        for name, bad, match in (('nan', torch.full_like(state[key], float('nan')), 'non-finite values'),
                                 ('int', state[key].long(), "is torch.int64 where the model's torch.float32"),
                                 ('meta', torch.empty(state[key].shape, device='meta'), 'is a meta tensor')):
            path = tmp_path / f'{name}.pth'
            torch.save({'model': {**state, key: bad}}, path)
            for must_fit in (False, True):
                with pytest.raises(CheckpointError, match=rf'{name}.pth: .*{re.escape(key)} .*{match}'):
                    MPViTCheckpointer(model, heads_must_fit=must_fit).load(str(path))


def _released_checkpoint(tmp_path, detector, variant):
    path = tmp_path / f'{detector}_mpvit_{variant}.pth'
    weights = synth_state_dict(golden(f'manifest_d2_{detector}_mpvit_{variant}.json')['tensors'])
    torch.save({'model': weights, 'iteration': 89999}, path)
    return path, weights


def test_retinanet_fpn_fidelity_against_reference(tmp_path):
    path, _ = _released_checkpoint(tmp_path, 'retinanet', 'small')
    cfg = _cfg('retinanet_mpvit_small_1x.yaml', 'MODEL.MPVIT.NORM', 'BN')
    model = build_model(cfg).eval()
    MPViTCheckpointer(model).load(str(path))
    ref = golden('d2_retinanet_mpvit_small_fpn_320x416.json')
    with torch.no_grad():
        features = model.backbone(synth_input(**ref['input']))
    assert list(features) == list(ref['outputs'])
    for name, summary in ref['outputs'].items():
        assert not compare(summary, features[name]), (name, compare(summary, features[name]))
    # The check can fail: one perturbed FPN weight changes P6/P7.
    model.backbone.top_block.p6.weight.data[0, 0, 0, 0] += 0.5
    with torch.no_grad():
        assert compare(ref['outputs']['p6'], model.backbone(synth_input(**ref['input']))['p6'])


def test_classification_checkpoint_initialises_backbone(tmp_path):
    classifier = timm.create_model('mpvit_tiny', num_classes=1000)
    path = tmp_path / 'mpvit_tiny.pth'
    torch.save({'model': classifier.state_dict(), 'epoch': 299}, path)
    model = build_model(_cfg('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.NORM', 'FrozenBN'))
    MPViTCheckpointer(model).load(str(path))
    expected = classifier.state_dict()
    for key, value in model.backbone.bottom_up.backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_backbone_weights_go_through_the_shared_extractor(tmp_path):
    """Any other task's checkpoint is fitted by mpvit.checkpoint.checkpoint_filter_fn, as in every adapter: the
    stem follows the detector's input channels, and another variant's weights are named, not half-loaded."""
    classifier = timm.create_model('mpvit_tiny', num_classes=1000)
    path = tmp_path / 'mpvit_tiny.pth'
    torch.save({'model': classifier.state_dict()}, path)
    gray = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.PIXEL_MEAN', [120.0], 'MODEL.PIXEL_STD', [60.0]))
    MPViTCheckpointer(gray).load(str(path))
    stem = gray.backbone.bottom_up.backbone.stem[0].conv.weight
    torch.testing.assert_close(stem, classifier.stem[0].conv.weight.sum(1, keepdim=True))
    small = build_model(_cfg('retinanet_mpvit_small_1x.yaml'))
    with pytest.raises(CheckpointError, match=r'mpvit_tiny\.pth: backbone weights: checkpoint does not fit MPViT'):
        MPViTCheckpointer(small).load(str(path))


def test_mismatched_checkpoint_is_named(tmp_path):
    path, _ = _released_checkpoint(tmp_path, 'retinanet', 'tiny')
    model = build_model(_cfg('retinanet_mpvit_small_1x.yaml'))
    with pytest.raises(CheckpointError, match='390 missing keys: .*743 keys of the wrong shape'):
        MPViTCheckpointer(model).load(str(path))
    # A RetinaNet checkpoint does not silently half-load into Mask R-CNN.
    model = build_model(_cfg('mask_rcnn_mpvit_tiny_1x.yaml'))
    expected = r'30 missing keys: backbone.fpn_lateral2.*24 unexpected keys: backbone.top_block.p6'
    with pytest.raises(CheckpointError, match=expected):
        MPViTCheckpointer(model).load(str(path))
    other = tmp_path / 'resnet.pth'
    torch.save({'model': {'backbone.bottom_up.res2.conv1.weight': torch.zeros(1)}}, other)
    with pytest.raises(CheckpointError, match='no MPViT weights'):
        MPViTCheckpointer(model).load(str(other))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="'mpvit_huge' is not an MPViT variant"):
        build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.NAME', 'mpvit_huge'))
    with pytest.raises(ValueError, match='OUT_FEATURES'):
        build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.OUT_FEATURES', ['res3', 'res4']))
    with pytest.raises(ValueError, match=r"needs \['stage2'\]"):
        build_model(_cfg('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.OUT_FEATURES', ['stage3', 'stage4', 'stage5']))
    with pytest.raises(ValueError, match='MODEL.MPVIT.NORM'):
        build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.NORM', 'LN'))


@pytest.mark.parametrize('norm', ['BN', 'FrozenBN', 'GN', 'SyncBN'])
def test_norms_and_output_shape(norm):
    model = build_model(_cfg('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.NORM', norm))
    bottom_up = model.backbone.bottom_up
    shapes = bottom_up.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        'stage2': (96, 4), 'stage3': (176, 8), 'stage4': (216, 16), 'stage5': (216, 32)}
    assert bottom_up.size_divisibility == 32
    with torch.no_grad():
        maps = bottom_up.eval()(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        k: (s.channels, 64 // s.stride, 96 // s.stride) for k, s in shapes.items()}


def test_fuse_folds_frozen_batch_norm():
    """Detectron2's FrozenBatchNorm2d (the ImageNet-pretrained norm of its recipes) folds like BatchNorm2d."""
    from detectron2.layers import FrozenBatchNorm2d

    backbone = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.NORM', 'FrozenBN')).backbone.bottom_up
    torch.manual_seed(0)
    frozen = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    for norm in frozen:
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.normal_(1, 0.1)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone.eval()(x)
        backbone.backbone.fuse()
        after = backbone(x)
    assert frozen and not [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-4)


def test_fast_ops_key_gives_flop_counting_the_textbook_ops():
    """``MODEL.MPVIT.FAST_OPS False`` (for Detectron2's analyze_model.py --tasks flop) builds the textbook ops."""
    from fvcore.nn import FlopCountAnalysis

    counts = {}
    for fast in (True, False):
        mpvit_model = build_model(_cfg('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.FAST_OPS', fast)).backbone.bottom_up
        assert {m.fast_ops for m in mpvit_model.modules() if hasattr(m, 'fast_ops')} == {fast}
        analysis = FlopCountAnalysis(mpvit_model.backbone.eval(), torch.zeros(1, 3, 64, 64))
        analysis.unsupported_ops_warnings(False)
        counts[fast] = analysis.total()
    assert counts[False] < counts[True]


def test_optimizer_groups_and_full_model_gradient_clipping():
    cfg = _cfg('retinanet_mpvit_tiny_1x.yaml', 'SOLVER.BACKBONE_MULTIPLIER', 0.1)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer).__name__ == 'AdamWFullModelGradientClipping'
    assert sorted(g['lr'] for g in optimizer.param_groups) == pytest.approx([1e-5, 1e-4])
    assert {g['weight_decay'] for g in optimizer.param_groups} == {0.05}
    params = [p for g in optimizer.param_groups for p in g['params']]
    assert len({id(p) for p in params}) == len(params) == len({id(p) for p in model.parameters()})
    for p in params:
        p.grad = torch.full_like(p, 10.)
    optimizer.step()
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item() == pytest.approx(1.0, rel=1e-3)


def test_detr_augmentation_multi_scale_and_crop():
    cfg = _cfg('mask_rcnn_mpvit_tiny_ms_3x.yaml', 'INPUT.MIN_SIZE_TRAIN', (96, 128), 'INPUT.MAX_SIZE_TRAIN', 200)
    augs = T.AugmentationList(build_detr_augmentation(cfg))
    np.random.seed(0)
    shapes, cropped = set(), 0
    for _ in range(16):
        aug_input = T.AugInput(np.zeros((480, 640, 3), np.uint8), boxes=np.array([[0., 0., 640., 480.]]))
        transform = augs(aug_input)
        h, w = aug_input.image.shape[:2]
        shapes.add((h, w))
        assert min(h, w) in (96, 128) or max(h, w) == 200
        cropped += any(isinstance(t, CropTransform) for t in transform.transforms)
    assert 0 < cropped < 16 and len(shapes) > 2  # half of the samples take the crop branch


# ---------------------------------------------------------------- end to end (real Detectron2 trainer, CPU)

@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return write_shapes_coco(tmp_path_factory.mktemp('coco_shapes'), train_images=6, val_images=3, size=(128, 96))


def _train_net(coco, config, out, *opts, flags=(), expect_ok=True):
    cmd = [
        sys.executable, str(REPO / 'detectron2' / 'train_net.py'), '--config-file', str(CONFIGS / config),
        '--coco-dataset', 'shapes_train', str(coco / 'annotations' / 'instances_train.json'), str(coco / 'train'),
        '--coco-dataset', 'shapes_val', str(coco / 'annotations' / 'instances_val.json'), str(coco / 'val'),
        *flags,
        'MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', 'OUTPUT_DIR', str(out),
        'DATASETS.TRAIN', "('shapes_train',)", 'DATASETS.TEST', "('shapes_val',)", 'DATALOADER.NUM_WORKERS', '0',
        'SOLVER.IMS_PER_BATCH', '2', 'SOLVER.WARMUP_ITERS', '1', 'SOLVER.CHECKPOINT_PERIOD', '2',
        'INPUT.MIN_SIZE_TRAIN', '(96,)', 'INPUT.MAX_SIZE_TRAIN', '160', 'INPUT.MIN_SIZE_TEST', '96',
        'INPUT.MAX_SIZE_TEST', '160',  # no NUM_CLASSES: the heads follow the data's 4 categories
        'MODEL.RETINANET.SCORE_THRESH_TEST', '0.0', 'MODEL.ROI_HEADS.SCORE_THRESH_TEST', '0.0',
        'SEED', '0',  # Detectron2 draws a seed per run otherwise: a 2-iteration model could predict nothing
        *opts,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    log = run.stdout + run.stderr
    assert (run.returncode == 0) == expect_ok, log[-4000:]
    return log


@pytest.mark.slow
def test_retinanet_train_eval_resume(coco, tmp_path):
    out = tmp_path / 'retinanet'
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', out, 'SOLVER.MAX_ITER', '2')
    assert 'Starting training from iteration 0' in log
    assert 'Evaluation results for bbox' in log and '|  AP   |  AP50  |' in log
    assert_scores(json.loads((out / 'eval_metrics.json').read_text())['bbox'], 'AP', 'AP50', 'AP75')
    assert (out / 'model_final.pth').is_file() and (out / 'last_checkpoint').read_text() == 'model_final.pth'
    # Resume: continues from the saved iteration with the saved optimizer/scheduler.
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', out, 'SOLVER.MAX_ITER', '4', flags=['--resume'])
    assert 'Starting training from iteration 2' in log
    iters = [json.loads(line)['iteration'] for line in (out / 'metrics.json').read_text().splitlines()
             if 'total_loss' in line]
    assert iters[-1] == 3
    # Evaluate the saved checkpoint, as a user evaluates a released one.
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', tmp_path / 'eval',
                     'MODEL.WEIGHTS', str(out / 'model_final.pth'), flags=['--eval-only'])
    assert 'Evaluation results for bbox' in log
    assert_scores(json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())['bbox'], 'AP', 'AP50', 'AP75')


@pytest.mark.slow
def test_mask_rcnn_detr_augmentation_train_eval(coco, tmp_path):
    out = tmp_path / 'mask_rcnn'
    log = _train_net(coco, 'mask_rcnn_mpvit_tiny_ms_3x.yaml', out, 'SOLVER.MAX_ITER', '3',
                     'INPUT.CROP.SIZE', '(64, 96)')
    assert 'AUG.DETR: flip, then multi-scale resize (96,)' in log and 'absolute_range crop (64, 96)' in log
    assert 'Evaluation results for bbox' in log and 'Evaluation results for segm' in log
    # The metrics file that tools/paper_tables.py --results reads, on the row this config reproduces.
    metrics = json.loads((out / 'eval_metrics.json').read_text())
    assert metrics['task'] == 'detectron2' and metrics['paper_row'] == 'mask_rcnn_mpvit_tiny_ms_3x'
    for kind in ('bbox', 'segm'):
        assert_scores(metrics[kind], 'AP', 'AP50', 'AP75')
    # And the demo draws the trained model's masks into a PNG.
    from PIL import Image
    demo_out = tmp_path / 'demo'
    run = subprocess.run(
        [sys.executable, str(REPO / 'detectron2' / 'demo.py'),
         '--config-file', str(CONFIGS / 'mask_rcnn_mpvit_tiny_ms_3x.yaml'),
         '--input', str(coco / 'val' / '000001.jpg'), '--output', str(demo_out), '--confidence-threshold', '0',
         'MODEL.WEIGHTS', str(out / 'model_final.pth'), 'INPUT.MIN_SIZE_TEST', '96', 'INPUT.MAX_SIZE_TEST', '160'],
        capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Image.open(demo_out / '000001.png').size == (128, 96)
    # No dataset registered, no NUM_CLASSES: the checkpoint's 4 classes, named as the training set's.
    assert torch.load(out / 'model_final.pth', weights_only=True)['dataset_meta']['thing_classes'] == \
        ['disc', 'square', 'triangle', 'cross']
    detections = re.findall(r'^  (\w+) +\d\.\d{3}  box', run.stdout, re.M)
    assert detections and set(detections) <= {'disc', 'square', 'triangle', 'cross'}, run.stdout
    assert f'wrote {demo_out.resolve() / "000001.png"}' in run.stdout
    # The dataset evaluated is recorded: a custom set, so it goes on no paper row (paper_tables).
    assert metrics['dataset'] == {'name': 'shapes_val', 'split': 'val', 'images': 3, 'num_classes': 4,
                                  'annotations': str(coco / 'annotations' / 'instances_val.json'),
                                  'sha256': metrics['dataset']['sha256']}


def test_divergence_stops_in_one_line(coco, tmp_path):
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', tmp_path / 'out', 'SOLVER.MAX_ITER', '4',
                     'SOLVER.BASE_LR', '1e30', 'SOLVER.CHECKPOINT_PERIOD', '1', expect_ok=False)
    assert re.fullmatch(r'error: training diverged: the loss is not finite \(\{.*\}\) at iteration [1-3] '
                        r'\(last finite loss \S+ at iteration \d\); stopped before saving it.*',
                        log.strip().splitlines()[-1]), log[-3000:]
    assert 'Traceback' not in log
    saved = sorted(p.name for p in (tmp_path / 'out').glob('model_*.pth'))
    for name in saved:  # the steps before the divergence: finite weights
        weights = torch.load(tmp_path / 'out' / name, weights_only=True)['model']
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name


def test_bad_config_options_and_gpus_are_named(tmp_path, train_net):
    """Each used to end in a traceback (or, for --num-gpus, in a minute of spawning first)."""
    from detectron2.engine import default_argument_parser

    from mpvit.errors import InvalidInputError

    broken = tmp_path / 'broken.yaml'
    broken.write_text('_BASE_: "Base-RetinaNet-MPViT.yaml"\nSOLVER: [1\n')
    config = str(CONFIGS / 'retinanet_mpvit_tiny_1x.yaml')
    cases = [
        ([config, 'OUTPUT_DIR', str(tmp_path), 'SOLVER.NO_SUCH_KEY', '1'],
         r'command-line config options: Non-existent key: SOLVER.NO_SUCH_KEY'),
        ([config, 'SOLVER.MAX_ITER'], r'command-line config options: Override list has odd length'),
        ([config, 'SOLVER.MAX_ITER', 'many'], r'command-line config options: .*SOLVER.MAX_ITER'),
        ([str(broken)], rf'--config-file {re.escape(str(broken))}: .*line 2'),
    ]
    for argv, message in cases:
        args = default_argument_parser().parse_args(['--config-file', *argv[:1], *argv[1:]])
        with pytest.raises(InvalidInputError, match=message):
            train_net.setup(args)
    if torch.cuda.device_count() < 64:
        with pytest.raises(InvalidInputError, match=r'--num-gpus 64: this machine has \d+ CUDA devices'):
            train_net.check_launch(default_argument_parser().parse_args(['--num-gpus', '64']))


def test_checkpoints_are_written_atomically_and_never_non_finite(tmp_path):
    from mpvit.errors import DivergenceError
    from mpvit.training import OutputError

    model = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml'))
    checkpointer = MPViTCheckpointer(model, str(tmp_path))
    checkpointer.save('model_0000009', iteration=9)
    assert (tmp_path / 'last_checkpoint').read_text() == 'model_0000009.pth'
    assert torch.load(tmp_path / 'model_0000009.pth', weights_only=True)['iteration'] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last_checkpoint', 'model_0000009.pth']
    with torch.no_grad():
        next(model.parameters()).fill_(float('nan'))
    with pytest.raises(DivergenceError, match=r'the weights are not finite \(backbone\.\S+\) at iteration 19'):
        checkpointer.save('model_0000019', iteration=19)
    assert not (tmp_path / 'model_0000019.pth').exists()
    (tmp_path / 'model_0000029.pth').mkdir()  # the rename cannot replace a directory: one line, nothing left over
    with torch.no_grad():
        next(model.parameters()).fill_(0.0)
    with pytest.raises(OutputError, match='cannot write .*model_0000029.pth'):
        checkpointer.save('model_0000029', iteration=29)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last_checkpoint', 'model_0000009.pth', 'model_0000029.pth']


def test_bad_dataset_path_is_named(coco, tmp_path):
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', tmp_path / 'x', expect_ok=False,
                     flags=['--coco-dataset', 'broken', str(tmp_path / 'nope.json'), str(coco / 'train')])
    assert f"{tmp_path / 'nope.json'} does not exist" in log


@pytest.fixture(scope='module')
def train_net(coco):
    """detectron2/train_net.py imported in-process, with the shapes dataset registered."""
    module = load_script('detectron2/train_net.py')
    module.register_coco_datasets([
        ['shapes_train', str(coco / 'annotations' / 'instances_train.json'), str(coco / 'train')],
        ['shapes_val', str(coco / 'annotations' / 'instances_val.json'), str(coco / 'val')],
    ])
    return module


def _every_config():
    """Every config; the fast tier keeps the smallest variant of each detector and schedule."""
    names = sorted(p.name for p in CONFIGS.glob('*.yaml') if not p.name.startswith('Base-'))
    parts = {n: re.fullmatch(r'(.+)_mpvit_([a-z]+)_(.+)\.yaml', n).groups() for n in names}
    fast: Dict[Tuple[str, str], str] = {}
    for name in sorted(names, key=lambda n: VARIANTS.index(parts[n][1])):
        fast.setdefault((parts[name][0], parts[name][2]), name)
    return [n if n in fast.values() else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize('config', _every_config())
def test_every_config_trains_a_step_and_evaluates(config, train_net, tmp_path):
    cfg = _cfg(config, 'OUTPUT_DIR', str(tmp_path),
               'DATASETS.TRAIN', ('shapes_train',), 'DATASETS.TEST', ('shapes_val',),
               'DATALOADER.NUM_WORKERS', 0, 'SOLVER.IMS_PER_BATCH', 1, 'SOLVER.MAX_ITER', 1,
               'INPUT.MIN_SIZE_TRAIN', (64,), 'INPUT.MAX_SIZE_TRAIN', 96, 'INPUT.CROP.SIZE', (48, 64),
               'INPUT.MIN_SIZE_TEST', 64, 'INPUT.MAX_SIZE_TEST', 96,
               'MODEL.RETINANET.NUM_CLASSES', 4, 'MODEL.ROI_HEADS.NUM_CLASSES', 4,
               # Every prediction is kept: a 1-iteration RetinaNet scores below the default 0.05, and COCO's AP
               # of no predictions is NaN.
               'MODEL.RETINANET.SCORE_THRESH_TEST', 0.0, 'MODEL.ROI_HEADS.SCORE_THRESH_TEST', 0.0)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = trainer.eval_results  # what the final evaluation hook computed
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    assert ('segm' in results) == cfg.MODEL.MASK_ON
    for kind in results:  # APs / APm / APl are NaN by COCO's rule when no object has that size
        assert_scores(results[kind], 'AP', 'AP50', 'AP75')


def _edited_coco(coco, tmp_path, edit, split='train'):
    """A copy of the shapes annotations of ``split`` after ``edit(dataset)``, registered under a fresh name."""
    from mpvit.d2 import register_coco_datasets

    dataset = json.loads((coco / 'annotations' / f'instances_{split}.json').read_text())
    edit(dataset)
    path = tmp_path / f'instances_{split}.json'
    path.write_text(json.dumps(dataset))
    name = f'edited_{tmp_path.name}'
    register_coco_datasets([[name, str(path), str(coco / split)]])
    return name, path


def _first_annotation(key, value):
    def edit(dataset):
        dataset['annotations'][0][key] = value
    return edit


def _set(part, index, **values):
    def edit(dataset):
        dataset[part][index].update(values)
    return edit


def _drop(part, index, key):
    def edit(dataset):
        del dataset[part][index][key]
    return edit


@pytest.mark.parametrize('case,edit,opts,message', [
    ('empty segmentation', _first_annotation('segmentation', []), (),
     r'1 annotations have an unusable segmentation: annotation id 1 \(image id 1\) has no segmentation \(\[\]\)'),
    ('RLE, polygon format', _first_annotation('segmentation', {'size': [96, 128], 'counts': [0, 10]}), (),
     'annotation id 1 .* RLE segmentation, which polygon masks cannot hold: set INPUT.MASK_FORMAT bitmask'),
    ('RLE of another size', _first_annotation('segmentation', {'size': [90, 128], 'counts': [0, 10]}),
     ('INPUT.MASK_FORMAT', 'bitmask'), r'annotation id 1 \(image id 1\) has an RLE of size \[90, 128\] on an image '
                                       r'of \[height, width\] \[96, 128\]'),
    ('image not on disk', _set('images', 1, file_name='gone.jpg'), (),
     r'1 of 6 listed images are not in .*train: gone.jpg'),
    ('unknown category id', _first_annotation('category_id', 7), (),
     r"category_id that is not among the file's categories: annotation id 1 \(image id 1\): category_id 7"),
    ('duplicate image id', lambda d: d['images'][1].update(id=d['images'][0]['id']), (),
     r'1 image ids are used more than once: 1; give every image its own id'),
    ('duplicate annotation id', _set('annotations', 1, id=1), (), r'1 annotation ids are used more than once: 1;'),
    ('dangling image id', _first_annotation('image_id', 99), (),
     r'1 image ids that annotations point to are not among its images: 99;'),
    # Detectron2 stopped on a bare AssertionError
    ('duplicate category id', _set('categories', 1, id=1), (), r'1 category ids are used more than once: 1;'),
    ('duplicate category name', _set('categories', 1, name='disc'), (),
     r"1 category names are used more than once: 'disc'; merge"),
    # KeyError tracebacks
    ('image without file_name', _drop('images', 0, 'file_name'), (), r'1 image entries without file_name: #0 \(id 1\)'),
    ('category without name', _drop('categories', 2, 'name'), (), r'1 category entries without name: #2 \(id 3\)'),
    ('annotation without bbox', _drop('annotations', 0, 'bbox'), (), r'1 annotation entries without bbox: #0 \(id 1\)'),
    # ValueError / TypeError tracebacks
    ('bbox of strings', _first_annotation('bbox', ['1', '2', '3', '4']), (),
     r"1 annotations have a bbox that is not 4 finite numbers: annotation id 1 \(image id 1\): \['1', '2'"),
    ('NaN bbox', _first_annotation('bbox', [float('nan'), 1.0, 2.0, 3.0]), (),
     r'bbox that is not 4 finite numbers: annotation id 1 \(image id 1\): \[nan, 1.0'),
    ('string image size', _set('images', 2, width='128'), (), r"image entries whose width is of the wrong type: #2 "
                                                              r"\(id 3\): width='128'"),
    # SizeMismatchError traceback after start-up
    ('wrong image size', _set('images', 1, width=100), (),
     r"1 images have a width / height that is not the file's: id 2 000002.jpg: json 100x96, file 128x96"),
])
def test_unusable_annotations_are_named_before_training(coco, tmp_path, train_net, case, edit, opts, message):
    name, path = _edited_coco(coco, tmp_path, edit)
    cfg = _cfg('mask_rcnn_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', (name,), 'DATASETS.TEST', ('shapes_val',),
               'MODEL.ROI_HEADS.NUM_CLASSES', 4, *opts)
    with pytest.raises(ValueError, match=f'{re.escape(str(path))}: .*{message}'):
        train_net.check_datasets(cfg)


def _exif_rotated_jpeg(path: Path, size=(128, 96)) -> None:
    """A JPEG stored ``size`` (w, h) with EXIF orientation 6: viewers and Detectron2 show it turned, h x w."""
    from PIL import Image

    exif = Image.Exif()
    exif[274] = 6
    Image.new('RGB', size, (30, 60, 90)).save(path, exif=exif.tobytes())


def test_sizes_files_and_evaluation_sets_are_checked(coco, tmp_path, train_net):
    """The json's sizes are the image as Detectron2 reads it (EXIF orientation applied: a SizeMismatchError
    traceback after start-up before); an empty image file, and a test set with nothing to score, are refused."""
    images = tmp_path / 'images'
    shutil.copytree(coco / 'train', images)
    _exif_rotated_jpeg(images / '000003.jpg')  # the json says 128x96, as stored; Detectron2 reads 96x128
    (images / '000004.jpg').write_bytes(b'')
    dataset = json.loads((coco / 'annotations' / 'instances_train.json').read_text())
    path = tmp_path / 'train.json'
    path.write_text(json.dumps(dataset))
    from mpvit.d2 import register_coco_datasets

    register_coco_datasets([['rotated', str(path), str(images)]])
    opts = ('MODEL.RETINANET.NUM_CLASSES', 4)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: 1 images have a width / height that is not the file's: id 3 000003.jpg: json 128x96, "
            'file 96x128 (EXIF orientation 6); write the size of the image as read (EXIF orientation applied)')
            + r'.*\(\+1 more kinds of problem: `python -m mpvit.check_data coco'):
        train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('rotated',),
                                      'DATASETS.TEST', (), *opts))
    dataset['images'][3]['file_name'] = dataset['images'][2]['file_name'] = '000001.jpg'
    path.write_text(json.dumps(dataset))
    train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('rotated',),
                                  'DATASETS.TEST', (), *opts))
    (images / '000001.jpg').write_bytes(b'')  # a zero-byte training image: was a traceback in training
    with pytest.raises(ValueError, match=re.escape(f'{path}: 3 image files are empty (0 bytes): 000001.jpg')):
        train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('rotated',),
                                      'DATASETS.TEST', (), *opts))
    for edit, message in ((lambda d: d.update(annotations=[]), 'has images but no annotations: nothing to score'),
                          (lambda d: d.update(images=[], annotations=[]), 'lists no image: nothing to evaluate')):
        folder = tmp_path / message[:9].replace(' ', '_')
        folder.mkdir()
        name, test_path = _edited_coco(coco, folder, edit, split='val')
        with pytest.raises(ValueError, match=re.escape(f'{test_path}: {message}')):
            train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('shapes_train',),
                                          'DATASETS.TEST', (name,), *opts), eval_only=True)


def test_missing_areas_are_filled_for_evaluation(coco, tmp_path, train_net, caplog):
    """Annotations without ``area`` (common in converted sets) are counted, and the evaluator's ground truth
    gets pycocotools' area (COCO evaluation needs it) instead of a KeyError after the whole inference."""
    def edit(dataset):
        for ann in dataset['annotations']:
            ann.pop('area')
    name, path = _edited_coco(coco, tmp_path, edit, split='val')
    cfg = _cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('shapes_train',), 'DATASETS.TEST', (name,),
               'MODEL.RETINANET.NUM_CLASSES', 4, 'OUTPUT_DIR', str(tmp_path / 'out'))
    with caplog.at_level(logging.WARNING, logger='mpvit.data'):
        train_net.check_datasets(cfg)
    count = len(json.loads(path.read_text())['annotations'])
    assert f'{path}: {count} annotations have no area: 1, 2, 3' in caplog.text
    truth = json.loads((coco / 'annotations' / 'instances_val.json').read_text())['annotations']
    filled = train_net.Trainer.build_evaluator(cfg, name)._coco_api.anns
    for ann in truth:  # the polygon's pixels, close to the exact polygon area demo_data wrote
        assert filled[ann['id']]['area'] == pytest.approx(ann['area'], rel=0.1)


def test_eval_only_without_weights_is_one_line(coco, tmp_path):
    """``--eval-only`` with ``MODEL.WEIGHTS ""`` evaluated heads that were never trained."""
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', tmp_path / 'out', flags=['--eval-only'], expect_ok=False)
    assert log.strip().splitlines()[-1] == ('error: --eval-only needs MODEL.WEIGHTS (a trained detector: a file, URL '
                                            'or released): without one it would score randomly initialised heads')
    assert 'Traceback' not in log and not (tmp_path / 'out' / 'eval_metrics.json').exists()


def test_empty_boxes_are_counted_and_named(coco, tmp_path, train_net, caplog):
    def edit(dataset):
        dataset['annotations'][0]['bbox'][2] = 0
        dataset['annotations'][2]['bbox'][3] = -1.5
    name, path = _edited_coco(coco, tmp_path, edit)
    with caplog.at_level(logging.WARNING, logger='mpvit.data'):
        train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', (name,),
                                      'DATASETS.TEST', ('shapes_val',), 'MODEL.RETINANET.NUM_CLASSES', 4))
    assert re.search(rf'{re.escape(str(path))}: 2 of \d+ annotations have no box of positive width and height: 1, 3; '
                     'training leaves them out', caplog.text, re.M), caplog.text


def test_unreadable_and_16_bit_images(coco, tmp_path, train_net, caplog):
    """Training leaves an unreadable or 16-bit image out, named (a truncated JPEG used to crash without the file's
    name; a 16-bit PNG was read all white); evaluation refuses it; a set of which nothing reads is refused."""
    from detectron2.data import DatasetMapper
    from PIL import Image

    from mpvit.d2 import SkipUnreadable, build_train_mapper, register_coco_datasets
    from mpvit.errors import InvalidInputError

    images = tmp_path / 'images'
    shutil.copytree(coco / 'train', images)
    truncated = sorted(images.glob('*.jpg'))[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    Image.fromarray(np.full((96, 128), 40000, np.uint16)).save(images / 'grey16.png')
    cfg = _cfg('retinanet_mpvit_tiny_1x.yaml', 'INPUT.MIN_SIZE_TRAIN', (64,), 'INPUT.MAX_SIZE_TRAIN', 96)
    train_mapper, test_mapper = build_train_mapper(cfg), SkipUnreadable(DatasetMapper(cfg, is_train=False), False)
    for path in (truncated, images / 'grey16.png'):
        record = dict(file_name=str(path), height=96, width=128, image_id=1, annotations=[])
        with caplog.at_level(logging.WARNING, logger='mpvit.data'):
            assert train_mapper(dict(record)) is None
        assert f'leaving out unreadable image {path}' in caplog.text
        with pytest.raises(InvalidInputError, match=f'unreadable image {path} '):
            test_mapper(dict(record))
    demo = load_script('detectron2/demo.py')  # the picture tool reads 16-bit grey as it looks
    assert (demo.load_bgr(str(images / 'grey16.png')) == 40000 >> 8).all()
    with pytest.raises(InvalidInputError, match=f'unreadable image {truncated}'):
        demo.load_bgr(str(truncated))
    good = sorted(images.glob('*.jpg'))[1]
    mapped = train_mapper(dict(file_name=str(good), height=96, width=128, image_id=2, annotations=[]))
    assert mapped['image'].shape[0] == 3

    # Detectron2's training loader, real records: the unreadable and 16-bit images are left out, every batch full.
    dataset = json.loads((coco / 'annotations' / 'instances_train.json').read_text())
    dataset['images'][1]['file_name'] = 'grey16.png'
    (tmp_path / 'some_broken.json').write_text(json.dumps(dataset))
    register_coco_datasets([['some_broken', str(tmp_path / 'some_broken.json'), str(images)]])
    loader = train_net.Trainer.build_train_loader(_cfg(
        'retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('some_broken',), 'DATALOADER.NUM_WORKERS', 0,
        'SOLVER.IMS_PER_BATCH', 2, 'INPUT.MIN_SIZE_TRAIN', (64,), 'INPUT.MAX_SIZE_TRAIN', 96))
    seen = [record['file_name'] for _, batch in zip(range(6), loader) for record in batch]
    assert len(seen) == 12 and not {str(truncated), str(images / 'grey16.png')} & set(seen)
    for image in dataset['images']:
        image['file_name'] = truncated.name
    path = tmp_path / 'all_broken.json'
    path.write_text(json.dumps(dataset))
    register_coco_datasets([['all_broken', str(path), str(images)]])
    with pytest.raises(InvalidInputError, match=f'{path}: none of its 6 images can be read'):
        train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', 'DATASETS.TRAIN', ('all_broken',),
                                      'DATASETS.TEST', ('shapes_val',), 'MODEL.RETINANET.NUM_CLASSES', 4))


def test_rle_with_bitmask_format_and_boxes_only_models_pass(coco, tmp_path, train_net):
    name, _ = _edited_coco(coco, tmp_path, _first_annotation('segmentation', {'size': [96, 128], 'counts': [0, 10]}))
    opts = ('DATASETS.TRAIN', (name,), 'DATASETS.TEST', ('shapes_val',), 'MODEL.ROI_HEADS.NUM_CLASSES', 4,
            'MODEL.RETINANET.NUM_CLASSES', 4)
    train_net.check_datasets(_cfg('mask_rcnn_mpvit_tiny_1x.yaml', *opts, 'INPUT.MASK_FORMAT', 'bitmask'))
    train_net.check_datasets(_cfg('retinanet_mpvit_tiny_1x.yaml', *opts))


def test_unusable_annotation_and_bad_output_dir_are_one_line(coco, tmp_path):
    _, path = _edited_coco(coco, tmp_path, _first_annotation('segmentation', []))
    log = _train_net(coco, 'mask_rcnn_mpvit_tiny_1x.yaml', tmp_path / 'out', 'DATASETS.TRAIN', "('broken',)",
                     flags=['--coco-dataset', 'broken', str(path), str(coco / 'train')], expect_ok=False)
    assert log.strip().splitlines()[-1].startswith(f'error: {path}: 1 annotations have an unusable segmentation: '
                                                   'annotation id 1 (image id 1) has no segmentation')
    assert 'Traceback' not in log
    (tmp_path / 'file').write_text('')
    log = _train_net(coco, 'retinanet_mpvit_tiny_1x.yaml', tmp_path / 'file' / 'out', expect_ok=False)
    assert log.strip().splitlines()[-1].startswith(f'error: OUTPUT_DIR {tmp_path / "file" / "out"} cannot be created')


def test_evaluation_refuses_heads_that_do_not_fit(tmp_path):
    trained = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.RETINANET.NUM_CLASSES', 4))
    torch.save({'model': trained.state_dict()}, tmp_path / 'four.pth')
    model = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.RETINANET.NUM_CLASSES', 3))
    MPViTCheckpointer(model).load(str(tmp_path / 'four.pth'))  # fine-tuning: the head is reset, as Detectron2 does
    # The class counts, not 'another variant' (a general key mismatch).
    with pytest.raises(CheckpointError, match=r'four\.pth: the checkpoint has heads for 4 classes, the model 3: '):
        MPViTCheckpointer(model, heads_must_fit=True).load(str(tmp_path / 'four.pth'))
    classifier = timm.create_model('mpvit_tiny')
    torch.save({'model': classifier.state_dict()}, tmp_path / 'classifier.pth')
    with pytest.raises(CheckpointError, match='backbone weights only'):
        MPViTCheckpointer(model, heads_must_fit=True).load(str(tmp_path / 'classifier.pth'))


@pytest.mark.slow
def test_second_install_run_is_a_quiet_no_op():
    """dev/install.sh on an installed machine changes nothing and prints no resolver complaints; the
    Detectron2 distribution's requirements agree with our pins (pip check)."""
    run = subprocess.run(['bash', str(REPO / 'dev' / 'install.sh')], capture_output=True, text=True,
                         env={**os.environ, 'PYTHON': sys.executable}, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in (run.stdout + run.stderr).splitlines() if not line.startswith('WARNING: Location')]
    assert lines == ['[install] pinned requirements (requirements.txt)', '[install] done'], lines
    check = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_class_count_follows_the_data_unless_set(coco, tmp_path, train_net):
    """No NUM_CLASSES: the heads take the data's category count (a 2-category set gave an 80-class head in
    silence); a NUM_CLASSES that contradicts the data, or train and test sets that disagree, is one line."""
    from mpvit.demo_data import write_shapes_coco
    from mpvit.errors import InvalidInputError

    fruit = write_shapes_coco(tmp_path / 'two', train_images=2, val_images=1, shapes=('disc', 'cross'))
    common = ['--coco-dataset', 'two_train', str(fruit / 'annotations' / 'instances_train.json'), str(fruit / 'train'),
              '--coco-dataset', 'two_val', str(fruit / 'annotations' / 'instances_val.json'), str(fruit / 'val'),
              'MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', 'DATASETS.TRAIN', "('two_train',)",
              'DATASETS.TEST', "('two_val',)", 'OUTPUT_DIR', str(tmp_path / 'out'), 'MODEL.MPVIT.NORM', 'BN']

    def setup(config, *opts, eval_only=False):
        flags = ['--eval-only'] if eval_only else []
        return train_net.setup(train_net.argument_parser().parse_args(
            ['--config-file', str(CONFIGS / config), *flags, *common, *opts]))

    for config in ('mask_rcnn_mpvit_tiny_1x.yaml', 'retinanet_mpvit_tiny_1x.yaml'):
        cfg = setup(config)
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == cfg.MODEL.RETINANET.NUM_CLASSES == 2
    assert build_model(cfg).num_classes == 2
    trained = ('MODEL.WEIGHTS', str(tmp_path / 'trained.pth'))  # evaluation needs trained heads
    assert setup('mask_rcnn_mpvit_tiny_1x.yaml', *trained, eval_only=True).MODEL.ROI_HEADS.NUM_CLASSES == 2
    assert setup('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.ROI_HEADS.NUM_CLASSES', '2').MODEL.ROI_HEADS.NUM_CLASSES == 2
    with pytest.raises(InvalidInputError, match=r'instances_train\.json: 2 categories, but '
                                                r'MODEL\.ROI_HEADS\.NUM_CLASSES is 80; leave'):
        setup('mask_rcnn_mpvit_tiny_1x.yaml', 'MODEL.ROI_HEADS.NUM_CLASSES', '80')
    with pytest.raises(InvalidInputError, match=r'instances_train\.json has 2 categories and .*instances_val\.json 4, '
                                                r"not the same \(by contiguous index: 1: 'cross' vs 'square'\)"):
        setup('mask_rcnn_mpvit_tiny_1x.yaml', 'DATASETS.TEST', "('shapes_val',)")


def test_demo_errors_are_one_line(coco, tmp_path):
    """A missing image, a threshold outside [0, 1], a missing weights file, and a config without a released
    checkpoint for 'released': user errors, raised before any model is built."""
    from mpvit.errors import InvalidInputError, MissingFileError

    demo = load_script('detectron2/demo.py')
    image = str(coco / 'val' / '000001.jpg')
    config = str(CONFIGS / 'mask_rcnn_mpvit_tiny_1x.yaml')
    base = ['--input', image, '--config-file', config, '--output', str(tmp_path)]
    with pytest.raises(MissingFileError, match=r'input image\(s\) not found: .*nothere\.jpg$'):
        demo.main(['--input', image, str(tmp_path / 'nothere.jpg'), *base[2:]])
    with pytest.raises(InvalidInputError, match=r'--confidence-threshold 2\.0: must be in \[0, 1\]'):
        demo.main([*base, '--confidence-threshold', '2'])
    with pytest.raises(MissingFileError, match=r'gone\.pth'):
        demo.main([*base, 'MODEL.WEIGHTS', str(tmp_path / 'gone.pth')])
    with pytest.raises(InvalidInputError, match='released no checkpoint for this config'):
        demo.main(['--input', image, '--config-file', str(CONFIGS / 'demo' / 'mask_rcnn_mpvit_tiny_shapes.yaml'),
                   '--output', str(tmp_path), 'MODEL.WEIGHTS', 'released'])
    assert not list(tmp_path.glob('*.png'))


def test_dataset_record_names_coco_by_its_categories(coco, tmp_path, train_net):
    """COCO val2017 registered under any name is 'coco' (the paper's rows); the shapes set keeps its name."""
    from mpvit.coco_checks import coco_2017_names
    from mpvit.d2 import register_coco_datasets
    dataset_record = train_net.dataset_record

    (tmp_path / 'val2017').mkdir()
    categories = [dict(id=i, name=name) for i, name in coco_2017_names().items()]
    (tmp_path / 'instances_val2017.json').write_text(json.dumps(dict(images=[], annotations=[],
                                                                     categories=categories)))
    register_coco_datasets([['my_coco_val', str(tmp_path / 'instances_val2017.json'), str(tmp_path / 'val2017')],
                            ['shapes_val', str(coco / 'annotations' / 'instances_val.json'), str(coco / 'val')]])
    record = dataset_record('my_coco_val', 5000)
    assert (record['name'], record['split'], record['images'], record['num_classes']) == ('coco', 'val2017', 5000, 80)
    assert dataset_record('shapes_val', 3)['name'] == 'shapes_val'


def test_categories_with_other_names_are_refused(coco, tmp_path, train_net):
    """Same count, other names or order: train and test sets, or a checkpoint's names and the test set's, are
    refused (label i would be scored as another class)."""
    from mpvit.d2.classes import check_same_classes, follow_dataset_classes, mark_num_classes_unset
    from mpvit.errors import InvalidInputError

    def reverse_names(dataset):
        names = [c['name'] for c in dataset['categories']]
        for category, other in zip(dataset['categories'], reversed(names)):
            category['name'] = other

    name, path = _edited_coco(coco, tmp_path, reverse_names)
    cfg = _cfg('mask_rcnn_mpvit_tiny_1x.yaml')
    mark_num_classes_unset(cfg)
    with pytest.raises(InvalidInputError, match=r"4 categories and .* 4, not the same \(by contiguous index: "
                                                r"0: 'disc' vs 'cross'"):
        follow_dataset_classes(cfg, ['shapes_train', name])
    assert 'from the data' in follow_dataset_classes(cfg, ['shapes_train', 'shapes_val'])
    with pytest.raises(CheckpointError, match=r"the checkpoint \(its dataset_meta\) has 2 categories"):
        check_same_classes(['a', 'b'], ['a', 'b', 'c'], 'the checkpoint (its dataset_meta)', 'the data',
                           CheckpointError)
    torch.manual_seed(0)
    model = build_model(_cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.RETINANET.NUM_CLASSES', 4,
                             'MODEL.MPVIT.NORM', 'BN'))
    torch.save({'model': model.state_dict(), 'dataset_meta': {'thing_classes': ['cross', 'triangle', 'square',
                                                                                 'disc']}}, tmp_path / 'w.pth')
    meta = {'dataset': 'shapes_val', 'thing_classes': ['disc', 'square', 'triangle', 'cross']}
    with pytest.raises(CheckpointError, match=r"w\.pth: the checkpoint \(its dataset_meta\) .*0: 'cross' vs 'disc'"):
        MPViTCheckpointer(model, heads_must_fit=True, dataset_meta=meta).load(str(tmp_path / 'w.pth'))
    MPViTCheckpointer(model, heads_must_fit=False, dataset_meta=meta).load(str(tmp_path / 'w.pth'))  # fine-tuning


def test_batch_paths_key_installs_the_batched_stages():
    """``MODEL.MPVIT.BATCH_PATHS always`` builds the backbone with batched stages; by default they run per-path."""
    from mpvit.models.batched_paths import BatchedMHCAStage
    from mpvit.models.mpvit import MHCAStage

    for value, kind in (('always', BatchedMHCAStage), ('auto', MHCAStage)):
        cfg = _cfg('retinanet_mpvit_tiny_1x.yaml', 'MODEL.MPVIT.BATCH_PATHS', value)
        bottom_up = build_model(cfg).backbone.bottom_up
        assert {type(m) for m in bottom_up.modules() if isinstance(m, MHCAStage)} == {kind}
