"""UperNet + MPViT on mmsegmentation: fidelity, released checkpoints, and the Runner end to end (CPU)."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fidelity import compare, golden, synth_input, synth_state_dict
from helpers import load_script
from PIL import Image

pytest.importorskip('mmseg')
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402
from mmseg.apis import inference_model, init_model  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

import mpvit.mmseg  # noqa: E402,F401
from mpvit import CheckpointError  # noqa: E402
from mpvit.serialization import safe_load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs' / 'semantic_segmentation'
register_all_modules()


def _tool(name):
    return load_script(f'semantic_segmentation/tools/{name}.py')


def _model_cfg(variant: str):
    cfg = Config.fromfile(str(CONFIGS / f'upernet_mpvit_{variant}_160k_ade20k.py'))
    cfg.model.backbone.pop('init_cfg')
    cfg.model.backbone.norm_layer = dict(type='BN', requires_grad=True)
    for part in ('decode_head', 'auxiliary_head'):
        cfg.model[part].norm_cfg = dict(type='BN', requires_grad=True)
    return cfg


@pytest.mark.parametrize('variant,params', [('small', 51_588_020), ('base', 105_295_196)])
def test_released_layout_and_parameter_count(variant, params, tmp_path):
    model = MODELS.build(_model_cfg(variant).model)
    manifest = golden(f'manifest_mmseg_upernet_mpvit_{variant}.json')
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest['tensors']
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params == manifest['params_trainable']
    # A released checkpoint (state_dict + meta) loads strictly, nothing missing or unexpected.
    path = tmp_path / 'released.pth'
    torch.save({'state_dict': synth_state_dict(manifest['tensors']), 'meta': {'iter': 160000}}, path)
    load_checkpoint(model, str(path), strict=True)


def test_upernet_fidelity_against_reference():
    model = MODELS.build(_model_cfg('small').model).eval()
    model.load_state_dict(synth_state_dict(golden('manifest_mmseg_upernet_mpvit_small.json')['tensors']))
    ref = golden('mmseg_upernet_mpvit_small_256x256.json')
    with torch.no_grad():
        logits = model.decode_head(model.backbone(synth_input(**ref['input'])))
    assert compare(ref['outputs']['seg_logits'], logits) == []


def test_pretrained_init_cfg_reads_classification_and_refuses_other_variants(tmp_path):
    weights = synth_state_dict(golden('manifest_mpvit_tiny.json')['tensors'])
    path = tmp_path / 'mpvit_tiny.pth'
    torch.save({'model': weights}, path)
    backbone = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny',
                                 init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    backbone.init_weights()
    assert backbone.is_init
    assert torch.equal(backbone.state_dict()['stem.0.conv.weight'], weights['stem.0.conv.weight'])
    assert [o.shape[1] for o in backbone(torch.randn(1, 3, 64, 64))] == [96, 176, 216, 216]

    other = MODELS.build(dict(type='MPViT', model_name='mpvit_small',
                              init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    with pytest.raises(CheckpointError, match='does not fit'):
        other.init_weights()
    with pytest.raises(ValueError, match='out_indices'):
        MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', out_indices=(4,)))


@pytest.mark.parametrize('layout', ['detectron2', 'mmseg'])
def test_pretrained_init_cfg_reads_the_backbone_of_detection_and_segmentation_checkpoints(tmp_path, layout):
    """A released Detectron2 (backbone.bottom_up.backbone.*, FPN and heads beside) or UperNet (backbone.*,
    decode heads beside) checkpoint initialises the backbone through the one shared extractor, also when the
    segmentor's init_weights reaches it (mmengine's BaseModule walk over the children)."""
    from mpvit.models.mpvit import MPViT, mpvit_arch

    torch.manual_seed(0)
    source = MPViT(**mpvit_arch('mpvit_tiny'), num_classes=0, global_pool='')
    with torch.no_grad():  # not the init's values (CPE / CRPE parameters have two keys each, the same tensor)
        for parameter in source.parameters():
            parameter.normal_()
    weights = source.state_dict()
    if layout == 'detectron2':
        checkpoint = {'model': {**{f'backbone.bottom_up.backbone.{k}': v for k, v in weights.items()},
                                'backbone.fpn_lateral2.weight': torch.zeros(256, 96, 1, 1),
                                'roi_heads.box_predictor.cls_score.weight': torch.zeros(81, 1024)}}
    else:
        checkpoint = {'state_dict': {**{f'backbone.{k}': v for k, v in weights.items()},
                                     'decode_head.conv_seg.weight': torch.zeros(150, 512, 1, 1)},
                      'meta': {'iter': 160000}}
    path = tmp_path / f'{layout}.pth'
    torch.save(checkpoint, path)
    cfg = _model_cfg('tiny')
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=str(path))
    segmentor = MODELS.build(cfg.model)
    segmentor.init_weights()
    assert segmentor.backbone.is_init
    loaded = segmentor.state_dict()
    assert all(torch.equal(loaded[f'backbone.{k}'], v) for k, v in weights.items())


def test_model_name_takes_the_variant_and_names_an_unknown_one():
    """The variant has one name in every adapter: timm's (Detectron2's MODEL.MPVIT.NAME, Deformable DETR's
    backbone); the short name and a dict of MPViT's own arguments still work."""
    from mpvit.errors import InvalidInputError
    from mpvit.models.mpvit import MPVIT_ARCHS

    named = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny'))
    assert named.out_channels == [96, 176, 216, 216]
    for other in ('tiny', dict(MPVIT_ARCHS['tiny'])):
        same = MODELS.build(dict(type='MPViT', model_name=other))
        assert {k: v.shape for k, v in same.state_dict().items()} == \
            {k: v.shape for k, v in named.state_dict().items()}
    for bad, message in (('mpvit_huge', r"model.backbone.model_name 'mpvit_huge' is not .*mpvit_tiny"),
                         (dict(MPVIT_ARCHS['tiny'], depths=(1, 1)),
                          'model.backbone.model_name has unknown keys depths'),
                         (3, 'model.backbone.model_name 3: expected a variant name')):
        with pytest.raises(InvalidInputError, match=f'^{message}') as error:
            MODELS.build(dict(type='MPViT', model_name=bad))
        assert '\n' not in str(error.value)


def test_backbone_wraps_the_core_model_with_its_flat_keys(tmp_path):
    """The backbone holds the core model (``.backbone``) but shows its keys unprefixed both ways, so released
    segmentors and classification checkpoints keep their keys; missing / unexpected keys are named as given."""
    from mmengine.runner.checkpoint import load_state_dict as mmengine_load_state_dict

    from mpvit.models.mpvit import MPViT

    backbone = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny'))
    assert isinstance(backbone.backbone, MPViT) and not isinstance(backbone, MPViT)
    state = backbone.state_dict()
    assert list(state) == list(backbone.backbone.state_dict()) and 'stem.0.conv.weight' in state
    assert 'backbone.stem.0.conv.weight' in dict(backbone.named_parameters())  # module paths keep the attribute

    fresh = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny'))
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())

    changed = {k: v for k, v in state.items() if k != 'stem.0.conv.weight'}
    changed['extra.weight'] = torch.zeros(1)
    result = fresh.load_state_dict(changed, strict=False)
    assert result.missing_keys == ['stem.0.conv.weight'] and result.unexpected_keys == ['extra.weight']
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "stem.0.conv.weight"'):
        fresh.load_state_dict(changed)

    # Under a parent (a segmentor, DDP's ``module.``), and through mmengine's own loader.
    holder = torch.nn.Module()
    holder.module = backbone
    assert list(holder.state_dict()) == [f'module.{k}' for k in state]
    other = torch.nn.Module()
    other.module = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny'))
    mmengine_load_state_dict(other, holder.state_dict(), strict=True)
    assert torch.equal(other.module.backbone.stem[0].conv.weight, backbone.backbone.stem[0].conv.weight)
    with pytest.raises(RuntimeError, match='missing keys in source state_dict: module.stem.0.conv.weight$'):
        mmengine_load_state_dict(other, {k: v for k, v in holder.state_dict().items()
                                         if k != 'module.stem.0.conv.weight'}, strict=True)

    # A whole segmentor saved by mmengine (and in the released layout) loads back strictly with load_checkpoint.
    segmentor = MODELS.build(_model_cfg('tiny').model)
    saved = segmentor.state_dict()
    assert 'backbone.stem.0.conv.weight' in saved and not any(k.startswith('backbone.backbone.') for k in saved)
    torch.save({'state_dict': saved, 'meta': {'iter': 1}}, tmp_path / 'iter_1.pth')
    again = MODELS.build(_model_cfg('tiny').model)
    load_checkpoint(again, str(tmp_path / 'iter_1.pth'), strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())


def test_fast_ops_false_gives_flop_counting_the_textbook_ops():
    """``--cfg-options model.backbone.fast_ops=False`` for get_flops.py: the textbook ops, the published count."""
    from mmengine.analysis import get_model_complexity_info

    counts = {}
    for fast in (True, False):
        backbone = MODELS.build(dict(type='MPViT', model_name='tiny', fast_ops=fast)).eval()
        assert {m.fast_ops for m in backbone.modules() if hasattr(m, 'fast_ops')} == {fast}
        counts[fast] = get_model_complexity_info(backbone, inputs=(torch.zeros(1, 3, 224, 224),), show_table=False,
                                                 show_arch=False)['flops']
    # The headless tiny backbone at 224: the reference's fvcore count less its head (a 7x7x216 average pool,
    # then 216 x 1000 multiply-adds).
    assert counts[False] == golden('manifest_mpvit_tiny.json')['fvcore_flops_224'] - 216 * 49 - 216 * 1000
    assert counts[False] < counts[True]


def test_norm_eval_keeps_bn_frozen():
    backbone = MODELS.build(dict(type='MPViT', model_name='tiny', norm_eval=True)).train()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert backbone.backbone.mhca_stages[0].mhca_blks[0].MHCA_layers[0].training


def _write_ade(root: Path, train: int = 4, val: int = 2, size=(96, 80)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (('training', train), ('validation', val)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros(size[::-1], np.uint8)
            label[:, size[0] // 2:] = 1 + i % 3  # left half "other" (0, ignored), right half a class
            image = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
            image[label > 0] //= 3
            Image.fromarray(image).save(root / 'images' / split / f'ADE_{split}_{i:08d}.jpg')
            Image.fromarray(label).save(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png')
    return root


def _small_run_cfg(data_root: Path, work_dir: Path, max_iters: int):
    train_tool = _tool('train')
    cfg = train_tool.build_config(train_tool.parse_args([
        str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), '--work-dir', str(work_dir), '--cfg-options',
        f'data_root={data_root}', f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}', f'test_dataloader.dataset.data_root={data_root}',
        'model.backbone.init_cfg.checkpoint=',  # no ImageNet weights offline
    ]))
    # Only size, iterations and norm differ from the real config.
    cfg.model.backbone.pop('init_cfg')
    cfg.model.backbone.norm_layer = dict(type='BN', requires_grad=True)
    for part in ('decode_head', 'auxiliary_head'):
        cfg.model[part].norm_cfg = dict(type='BN', requires_grad=True)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.train_dataloader.dataset.pipeline[3].scale = (128, 64)
    cfg.train_dataloader.dataset.pipeline[4].crop_size = (64, 64)
    cfg.val_dataloader.dataset.pipeline[1].scale = (128, 64)
    cfg.test_dataloader = cfg.val_dataloader
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = 2
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.param_scheduler[0].end = 1
    cfg.env_cfg.cudnn_benchmark = False
    return cfg


@pytest.mark.slow
def test_runner_train_val_resume_test_and_inference(tmp_path):
    data_root = _write_ade(tmp_path / 'ADEChallengeData2016')
    work_dir = tmp_path / 'work'
    runner = Runner.from_cfg(_small_run_cfg(data_root, work_dir, max_iters=2))
    runner.train()
    assert (work_dir / 'iter_2.pth').is_file()
    log = ''.join(p.read_text() for p in work_dir.rglob('*.log'))
    assert 'mIoU' in log

    cfg = _small_run_cfg(data_root, work_dir, max_iters=4)
    cfg.resume = True
    resumed = Runner.from_cfg(cfg)
    resumed.train()
    assert resumed.iter == 4 and (work_dir / 'iter_4.pth').is_file()

    metrics = _tool('test').main([
        str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), str(work_dir / 'iter_4.pth'),
        '--work-dir', str(tmp_path / 'test'), '--show-dir', str(tmp_path / 'vis'), '--cfg-options',
        f'test_dataloader.dataset.data_root={data_root}', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False', 'model.backbone.norm_layer.type=BN',
        'model.decode_head.norm_cfg.type=BN', 'model.auxiliary_head.norm_cfg.type=BN'])
    assert 'mIoU' in metrics
    assert list((tmp_path / 'vis').rglob('*.png'))
    written = json.loads((tmp_path / 'test' / 'eval_metrics.json').read_text())
    assert written['paper_row'] == 'upernet_mpvit_small' and written['mIoU'] == metrics['mIoU']
    assert 0.0 <= metrics['mIoU'] <= 100.0

    model = init_model(cfg, str(work_dir / 'iter_4.pth'), device='cpu')
    image = str(next((data_root / 'images' / 'validation').glob('*.jpg')))
    result = inference_model(model, image)
    assert tuple(result.pred_sem_seg.data.shape[-2:]) == (80, 96)

    config = tmp_path / 'run_config.py'
    cfg.dump(str(config))
    demo = load_script('semantic_segmentation/demo.py')
    out = demo.main([image, str(config), str(work_dir / 'iter_4.pth'), '--out', str(tmp_path / 'overlay.png')])
    assert Image.open(out).size == (96, 80)


def test_missing_data_root_is_named(tmp_path):
    train_tool = _tool('train')
    with pytest.raises(FileNotFoundError, match='nowhere'):
        train_tool.build_config(train_tool.parse_args([
            str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), '--work-dir', str(tmp_path),
            '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path / "nowhere"}']))


def test_label_of_the_wrong_size_is_named(tmp_path):
    data_root = _write_ade(tmp_path / 'ADEChallengeData2016')
    cfg = _small_run_cfg(data_root, tmp_path / 'work', max_iters=2)  # train.py would refuse the label below
    label = next((data_root / 'annotations' / 'training').glob('*.png'))
    Image.fromarray(np.ones((40, 50), np.uint8)).save(label)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=f'{label.name} is 50x40 but image .* is 96x80'):
        runner.train()


@pytest.mark.parametrize('split', ['training', 'validation'])
def test_label_values_outside_the_classes_are_named(tmp_path, split):
    """Training used to crash with "Target 199 is out of bounds"; validation silently gave mIoU 0."""
    data_root = _write_ade(tmp_path / 'ADEChallengeData2016')
    cfg = _small_run_cfg(data_root, tmp_path / 'work', max_iters=2)  # train.py would refuse the label below
    label = sorted((data_root / 'annotations' / split).glob('*.png'))[-1]
    values = np.array(Image.open(label))
    values[:4, :4] = 200
    Image.fromarray(values).save(label)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match=f'label .*{label.name} holds values 200 outside the 150 classes'):
        runner.train() if split == 'training' else runner.val()


def test_masks_are_checked_before_the_runner_is_built(tmp_path, capsys):
    """Masks of another size, label values outside the classes and RGB masks were found only once training
    or validation reached them: train.py / test.py refuse them before building anything, and the command
    lists them all."""
    from mpvit.check_data import main as check_data

    data_root = _write_ade(tmp_path / 'ADEChallengeData2016', train=3, val=1)
    masks = sorted((data_root / 'annotations' / 'training').glob('*.png'))
    Image.fromarray(np.ones((40, 50), np.uint8)).save(masks[0])
    values = np.array(Image.open(masks[1]))
    values[:2, :2] = 200  # 150 classes stored 1..150, 0 and 255 ignored
    Image.fromarray(values).save(masks[1])
    Image.fromarray(np.zeros((80, 96, 3), np.uint8)).save(masks[2])
    with pytest.raises(ValueError, match=re.escape(
            f"{data_root / 'annotations' / 'training'}: 1 masks are not of their image's size: {masks[0].name}: "
            '50x40, image 96x80; write each mask at its image\'s size (+2 more kinds of problem: `python -m '
            f"mpvit.check_data segmentation {data_root / 'images' / 'training'}")):
        _small_run_cfg(data_root, tmp_path / 'work', max_iters=2)
    assert check_data(['segmentation', str(data_root / 'images' / 'training'),
                       str(data_root / 'annotations' / 'training'), '--classes', '150', '--reduce-zero-label']) == 1
    out = capsys.readouterr().out
    assert f'1 masks have label values outside the classes and the ignore index: {masks[1].name}: 200; labels are ' \
           '1..150 and 255 (ignored), with raw 0 ignored (reduce_zero_label)' in out
    assert f'1 masks have RGB pixels, not class indices: {masks[2].name}' in out
    test_tool = _tool('test')  # evaluation: the test set only, refused before the checkpoint is read
    (data_root / 'annotations' / 'validation' / sorted((data_root / 'images' / 'validation').glob('*.jpg'))[0]
     .with_suffix('.png').name).unlink()
    with pytest.raises(ValueError, match=r'validation: 1 images have no mask: ADE_validation_00000000.png'):
        test_tool.main([str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), str(tmp_path / 'none.pth'),
                        '--work-dir', str(tmp_path / 'w'), '--cfg-options', f'data_root={data_root}',
                        f'test_dataloader.dataset.data_root={data_root}'])


def test_colour_label_png_is_named(tmp_path):
    from mmseg.datasets.transforms import LoadAnnotations

    from mpvit.mmseg import CheckSegMap

    path = tmp_path / 'rgb.png'
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(path)
    loaded = LoadAnnotations()(
        dict(seg_map_path=str(path), reduce_zero_label=True, seg_fields=[], ori_shape=(8, 10)))
    with pytest.raises(ValueError, match='rgb.png has 3 channels'):
        CheckSegMap(num_classes=150)(loaded)
    Image.fromarray(np.full((8, 10), 150, np.uint8)).save(path)  # class 150 of 150 (stored 1..150): valid
    loaded = LoadAnnotations()(
        dict(seg_map_path=str(path), reduce_zero_label=True, seg_fields=[], ori_shape=(8, 10)))
    assert CheckSegMap(num_classes=150)(loaded) is not None


def test_evaluation_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    """mmengine loads non-strictly; test.py must not evaluate a segmentor with a reset head."""
    data_root = _write_ade(tmp_path / 'ADEChallengeData2016', train=1, val=1)
    cfg = _model_cfg('small')
    cfg.model.decode_head.num_classes = 10
    torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, tmp_path / 'ten_classes.pth')
    with pytest.raises(CheckpointError, match=r'ten_classes.pth does not fit .*keys of the wrong shape: '
                                              r'decode_head.conv_seg.weight \(checkpoint \(10,'):
        _tool('test').main([
            str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), str(tmp_path / 'ten_classes.pth'),
            '--work-dir', str(tmp_path / 'test'), '--cfg-options', f'test_dataloader.dataset.data_root={data_root}',
            'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
            'model.backbone.norm_layer.type=BN', 'model.decode_head.norm_cfg.type=BN',
            'model.auxiliary_head.norm_cfg.type=BN'])


def _test_tool_args(data_root):
    return ['--cfg-options', f'test_dataloader.dataset.data_root={data_root}', 'test_dataloader.num_workers=0',
            'test_dataloader.persistent_workers=False', 'model.backbone.norm_layer.type=BN',
            'model.decode_head.norm_cfg.type=BN', 'model.auxiliary_head.norm_cfg.type=BN']


def test_evaluation_refuses_a_backbone_only_checkpoint(tmp_path):
    """A backbone-only file used to be evaluated with a random decode head."""
    import timm

    data_root = _write_ade(tmp_path / 'ADEChallengeData2016', train=1, val=1)
    torch.save({'model': timm.create_model('mpvit_small').state_dict()}, tmp_path / 'classifier.pth')
    backbone = MODELS.build(_model_cfg('small').model).backbone
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in backbone.state_dict().items()}},
               tmp_path / 'backbone.pth')
    for name, kind in (('classifier.pth', 'a classification'), ('backbone.pth', 'a segmentation or backbone')):
        with pytest.raises(CheckpointError, match=rf'{name} is {kind} checkpoint, with no segmentor weights '
                                                  r'\(decode_head\.\*\): evaluating it would score randomly'):
            _tool('test').main([str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), str(tmp_path / name),
                                '--work-dir', str(tmp_path / 'test'), *_test_tool_args(data_root)])
    assert not (tmp_path / 'test' / 'eval_metrics.json').exists()


def test_divergence_stops_before_a_checkpoint_is_written(tmp_path):
    """A NaN loss used to train on, save NaN checkpoints and report an mIoU."""
    from mpvit.errors import DivergenceError

    data_root = _write_ade(tmp_path / 'ADEChallengeData2016')
    cfg = _small_run_cfg(data_root, tmp_path / 'work', max_iters=4)
    cfg.optim_wrapper.optimizer.lr = 1e30
    cfg.default_hooks.checkpoint.interval = 1
    with pytest.raises(DivergenceError, match=r'loss is (nan|inf) at iteration [2-4] \(last finite loss \S+ at '
                                              r'iteration [1-3]\); stopped before saving it'):
        Runner.from_cfg(cfg).train()
    for path in (tmp_path / 'work').glob('iter_*.pth'):
        weights = safe_load(path)['state_dict']
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), path
    # A finite loss whose step made the weights non-finite: the checkpoint is refused.
    from types import SimpleNamespace

    from mpvit.mmseg import StopOnNonFiniteLoss

    hook = StopOnNonFiniteLoss()
    hook.before_save_checkpoint(SimpleNamespace(iter=3), {'state_dict': {'w': torch.ones(2)}, 'meta': {'iter': 4}})
    with pytest.raises(DivergenceError, match=r'the weights are not finite \(w\) at iteration 4'):
        hook.before_save_checkpoint(SimpleNamespace(iter=3), {'state_dict': {'w': torch.tensor([1.0, float('inf')])},
                                                               'meta': {'iter': 4}})


def test_weights_that_are_none_are_refused_by_load_from_and_test(tmp_path):
    """load_from used to copy NaN / integer weights in (cast silently) and train on; test.py to score them."""
    data_root = _write_ade(tmp_path / 'ADEChallengeData2016', train=1, val=1)
    cfg = _small_run_cfg(data_root, tmp_path / 'work', max_iters=1)
    state = MODELS.build(cfg.model).state_dict()
    key = 'decode_head.conv_seg.weight'
    torch.save({'state_dict': {**state, key: torch.full_like(state[key], float('nan'))}}, tmp_path / 'nan.pth')
    torch.save({'state_dict': {**state, key: state[key].long()}}, tmp_path / 'int.pth')
    cfg.load_from = str(tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError, match=rf'nan.pth: {key} holds [\d,]+ non-finite values'):
        Runner.from_cfg(cfg).train()
    assert not list((tmp_path / 'work').glob('iter_*.pth'))
    with pytest.raises(CheckpointError, match=rf"int.pth: {key} is torch.int64 where the model's torch.float32"):
        _tool('test').main([str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py'), str(tmp_path / 'int.pth'),
                            '--work-dir', str(tmp_path / 'test'), *_test_tool_args(data_root)])
    assert not (tmp_path / 'test' / 'eval_metrics.json').exists()


def test_config_syntax_error_and_nccl_without_cuda_are_named(tmp_path):
    load_run_config = importlib.import_module('mpvit.mmseg.run_config').load_run_config

    bad = tmp_path / 'bad_config.py'
    bad.write_text("_base_ = ['x.py']\nmodel = dict(\n")
    with pytest.raises(ValueError, match=r'bad_config.py \(or a file it inherits\) is not valid Python \(line 2\): '
                                         r'.*never closed'):
        load_run_config(str(bad))
    config = str(CONFIGS / 'upernet_mpvit_small_160k_ade20k.py')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--launcher pytorch: .*nccl, which needs CUDA GPUs'):
            load_run_config(config, launcher='pytorch')
    gloo = load_run_config(config, launcher='pytorch', cfg_options={'env_cfg.dist_cfg.backend': 'gloo'})
    assert gloo.env_cfg.dist_cfg.backend == 'gloo'


@pytest.mark.skipif(torch.cuda.device_count() >= 64, reason='a machine with 64 GPUs')
@pytest.mark.parametrize('script', ['dist_train.sh', 'dist_test.sh'])
def test_dist_scripts_refuse_more_gpus_than_there_are(script):
    import subprocess

    args = ['CONFIG', '64'] if script == 'dist_train.sh' else ['CONFIG', 'CHECKPOINT', '64']
    run = subprocess.run(['bash', str(REPO / 'semantic_segmentation' / 'tools' / script), *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and run.stdout == ''
    assert run.stderr.strip() == (f'error: {script}: 64 GPUs asked for, this machine has '
                                  f'{torch.cuda.device_count()} CUDA devices')
    args[-1] = 'eight'
    run = subprocess.run(['bash', str(REPO / 'semantic_segmentation' / 'tools' / script), *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {script}: GPUS must be a positive number, got 'eight'"


def test_unreadable_images_left_out_in_training_refused_in_evaluation(tmp_path, caplog):
    """A truncated JPEG used to end in an AssertionError traceback; a set of which nothing reads is refused
    before training starts."""
    from mmseg.registry import DATASETS

    from mpvit.errors import InvalidInputError

    data_root = _write_ade(tmp_path / 'ADEChallengeData2016', train=3, val=1)
    cfg = _small_run_cfg(data_root, tmp_path / 'work', max_iters=2)
    images = sorted((data_root / 'images' / 'training').glob('*.jpg'))
    images[0].write_bytes(images[0].read_bytes()[:100])
    train = DATASETS.build(cfg.train_dataloader.dataset)
    with caplog.at_level('WARNING', logger='mpvit.data'):
        sample = train[0]
    assert f'leaving out unreadable image {images[0]}' in caplog.text
    assert sample['data_samples'].img_path != str(images[0])
    test_cfg = cfg.val_dataloader.dataset.copy()
    test_cfg.data_prefix = dict(img_path='images/training', seg_map_path='annotations/training')
    with pytest.raises(InvalidInputError, match=f'unreadable image {images[0]} .*evaluation needs every image'):
        DATASETS.build(test_cfg)[0]
    for path in images[1:]:
        path.write_bytes(b'')
    with pytest.raises(InvalidInputError, match=r'training set .*none of its 3 images can be read'):
        Runner.from_cfg(cfg).train()


# ---------------------------------------------------------------------------------------------------------------
# Your own data (issue #22): the custom configs, T / XS, classes following the data, the demo.

CUSTOM_CLASSES = ('sky', 'road', 'car')


def _write_custom(root: Path, train: int = 4, val: int = 2, size=(96, 80)) -> Path:
    """The layout of configs/semantic_segmentation/_base_/datasets/custom.py: img_dir/{train,val}/*.jpg and
    one-channel label PNGs ann_dir/{train,val}/*.png of values 0..2 (a band of 255, not labelled)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train), ('val', val)):
        (root / 'img_dir' / split).mkdir(parents=True)
        (root / 'ann_dir' / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros(size[::-1], np.uint8)  # top: sky (0)
            label[size[1] // 3:] = 1  # middle: road
            label[2 * size[1] // 3:, (i * 16) % size[0]:] = 2  # bottom right: car
            label[:, :4] = 255
            image = (np.array([[200, 220, 255], [90, 90, 90], [220, 30, 30]], np.uint8)[np.minimum(label, 2)]
                     + rng.integers(0, 20, (*size[::-1], 3), dtype=np.uint8))
            Image.fromarray(image).save(root / 'img_dir' / split / f'{split}_{i:03d}.jpg')
            Image.fromarray(label).save(root / 'ann_dir' / split / f'{split}_{i:03d}.png')
    return root


def _custom_options(data_root: Path, classes=CUSTOM_CLASSES) -> list:
    """What a user on a CPU types: the data and its classes, then only size, norm and length made small."""
    options = [f'data_root={data_root}', f'classes=[{",".join(classes)}]', 'model.backbone.init_cfg=None',
               'model.data_preprocessor.size=(64,64)', 'train_dataloader.dataset.pipeline.3.scale=(128,64)',
               'train_dataloader.dataset.pipeline.4.crop_size=(64,64)', 'train_cfg.max_iters=2',
               'train_cfg.val_begin=3', 'default_hooks.checkpoint.interval=2', 'default_hooks.logger.interval=1',
               'param_scheduler.0.end=1', 'env_cfg.cudnn_benchmark=False']
    options += [f'{loader}.dataset.pipeline.1.scale=(128,64)' for loader in ('val_dataloader', 'test_dataloader')]
    options += ['model.backbone.norm_layer.type=BN', 'model.decode_head.norm_cfg.type=BN',
                'model.auxiliary_head.norm_cfg.type=BN']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']
    return options


@pytest.mark.slow  # about 50 s on 2 CPU cores
def test_your_own_data_train_test_demo(tmp_path, capsys):
    """The README's route on 3 classes of the user's own: train.py with the T custom config, test.py
    (a finite mIoU, the 3 names as the table's rows, the dataset record), and the demo with the trained
    checkpoint (its class names, where it wrote)."""
    import re

    data_root = _write_custom(tmp_path / 'street')
    config = str(CONFIGS / 'custom' / 'upernet_mpvit_tiny_custom.py')
    work_dir = tmp_path / 'work'
    runner = _tool('train').main([config, '--work-dir', str(work_dir), '--cfg-options', *_custom_options(data_root)])
    assert runner.model.decode_head.num_classes == runner.model.auxiliary_head.num_classes == 3
    checkpoint = work_dir / 'iter_2.pth'
    from mpvit.checkpoint import read_checkpoint

    assert read_checkpoint(str(checkpoint))['meta']['dataset_meta']['classes'] == CUSTOM_CLASSES

    metrics = _tool('test').main([config, str(checkpoint), '--work-dir', str(tmp_path / 'test'),
                                  '--cfg-options', *_custom_options(data_root)])
    assert np.isfinite(metrics['mIoU']) and 0.0 <= metrics['mIoU'] <= 100.0
    written = json.loads((tmp_path / 'test' / 'eval_metrics.json').read_text())
    assert written['paper_row'] is None
    labels = sorted(p.name for p in (data_root / 'ann_dir' / 'val').glob('*.png'))
    eval_results = importlib.import_module('mpvit.eval_results')
    assert written['dataset'] == dict(name='street', split='val', images=2, annotations=None,
                                      sha256=eval_results.fingerprint_names(labels), num_classes=3)
    assert not eval_results.on_paper_dataset('mmseg', written['dataset'])
    log = ''.join(p.read_text() for p in (tmp_path / 'test').rglob('*.log'))
    rows = dict(re.findall(r'^\|\s*(\w+)\s*\|\s*([\d.]+|nan)\s*\|', log, re.MULTILINE))
    assert {name: rows.get(name) for name in CUSTOM_CLASSES} == {name: rows[name] for name in CUSTOM_CLASSES}
    assert 'nan' not in [rows[name] for name in CUSTOM_CLASSES] and set(rows) - {'Class'} == set(CUSTOM_CLASSES)

    capsys.readouterr()
    image = data_root / 'img_dir' / 'val' / 'val_000.jpg'
    out = tmp_path / 'demo' / 'overlay.png'
    out.parent.mkdir()
    # The config's own data names 2 classes: the demo takes the checkpoint's 3.
    demo = load_script('semantic_segmentation/demo.py')
    demo.main([str(image), config, str(checkpoint), '--out', str(out)])
    printed = capsys.readouterr().out
    assert Image.open(out).size == (96, 80)
    found = re.findall(r'^  (\w+)\s+([\d.]+)%$', printed, re.MULTILINE)
    assert found and {name for name, _ in found} <= set(CUSTOM_CLASSES)
    assert abs(sum(float(share) for _, share in found) - 100.0) < 0.5
    assert printed.rstrip().endswith(f'wrote the overlay to {out}')


def test_150_class_heads_on_3_class_data_stop_in_one_line(tmp_path):
    """The issue's run: a 150-class segmentor trained / scored on 3-class data gave mIoU 0 and NaN rows."""
    import os
    import subprocess
    import sys

    from mpvit.errors import InvalidInputError
    load_run_config = importlib.import_module('mpvit.mmseg.run_config').load_run_config

    data_root = _write_custom(tmp_path / 'street', train=1, val=1)
    config = str(CONFIGS / 'custom' / 'upernet_mpvit_tiny_custom.py')
    options = [f'data_root={data_root}', 'classes=[sky,road,car]', 'model.decode_head.num_classes=150',
               'model.auxiliary_head.num_classes=150']
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')])}
    run = subprocess.run([sys.executable, str(REPO / 'semantic_segmentation' / 'tools' / 'train.py'), config,
                          '--work-dir', str(tmp_path / 'work'), '--cfg-options', *options],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        'error: the data has 3 classes (train_dataloader.dataset.metainfo.classes) but model.decode_head.num_classes '
        'is 150, model.auxiliary_head.num_classes is 150: set --cfg-options model.decode_head.num_classes=3 '
        'model.auxiliary_head.num_classes=3 (the configs of configs/semantic_segmentation/custom/ take it from the '
        'data)')
    assert not list((tmp_path / 'work').rglob('*.pth'))
    # The ADE20K config's heads on data declared with 3 classes: the same line.
    ade = str(CONFIGS / 'upernet_mpvit_tiny_160k_ade20k.py')
    own = {f'{loader}.dataset.{key}': value for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
           for key, value in (('type', 'BaseSegDataset'), ('metainfo', dict(classes=CUSTOM_CLASSES)))}
    with pytest.raises(InvalidInputError, match=r'^the data has 3 classes .* model.decode_head.num_classes is 150'):
        load_run_config(ade, cfg_options=own)
    # Dataloaders that disagree, and a dataset that names no classes, are one line too.
    with pytest.raises(InvalidInputError, match=r'train_dataloader.* has 3 classes but val_dataloader.* has 2'):
        load_run_config(config, cfg_options={'train_dataloader.dataset.metainfo.classes': CUSTOM_CLASSES})
    with pytest.raises(InvalidInputError, match=r'train_dataloader.dataset \(BaseSegDataset\) names no classes'):
        load_run_config(config, cfg_options={f'{loader}.dataset.metainfo': None for loader in
                                             ('train_dataloader', 'val_dataloader', 'test_dataloader')})


def test_label_check_follows_the_data_classes_and_ignore_index(tmp_path):
    """CheckSegMap takes the dataset's class count and ignore index, whatever the pipeline says: value 3 of
    3 classes is refused, the ignore index (here 200) passes."""
    from mmseg.registry import DATASETS

    load_run_config = importlib.import_module('mpvit.mmseg.run_config').load_run_config

    data_root = _write_custom(tmp_path / 'street', train=1, val=1)
    label_path = data_root / 'ann_dir' / 'train' / 'train_000.png'
    label = np.array(Image.open(label_path))
    label[label == 255] = 200
    Image.fromarray(label).save(label_path)
    config = str(CONFIGS / 'custom' / 'upernet_mpvit_tiny_custom.py')
    cfg = load_run_config(config, cfg_options={'data_root': str(data_root), 'classes': list(CUSTOM_CLASSES),
                                               'ignore_index': 200})
    checks = [step for step in cfg.train_dataloader.dataset.pipeline if step['type'] == 'CheckSegMap']
    assert checks == [dict(type='CheckSegMap', num_classes=3, ignore_index=200)]
    assert cfg.model.decode_head.ignore_index == cfg.model.data_preprocessor.seg_pad_val == 200
    assert cfg.test_evaluator.ignore_index == 200
    assert DATASETS.build(cfg.train_dataloader.dataset)[0] is not None  # 200 = not labelled: valid
    label[:4, 10:14] = 3
    Image.fromarray(label).save(label_path)
    with pytest.raises(ValueError, match=r'train_000.png holds values 3 outside the 3 classes \(valid: 0..2, '
                                         r'200 = ignored\)'):
        DATASETS.build(cfg.train_dataloader.dataset)[0]


@pytest.mark.parametrize('variant', ['tiny', 'xsmall', 'small', 'base'])
def test_every_variant_has_ade20k_and_custom_configs_whose_heads_fit_the_backbone(variant):
    """T / XS are configured like S / B (no released weights, so no paper row); each custom config has the
    same model as the ADE20K one, heads sized by the data."""
    from mpvit import model_zoo

    ade = Config.fromfile(str(CONFIGS / f'upernet_mpvit_{variant}_160k_ade20k.py'))
    custom = Config.fromfile(str(CONFIGS / 'custom' / f'upernet_mpvit_{variant}_custom.py'))
    for part in ('backbone', 'decode_head', 'auxiliary_head'):
        mine, theirs = ({k: v for k, v in c.model[part].items() if k not in ('num_classes', 'ignore_index')}
                        for c in (custom, ade))
        assert mine == theirs, part
    assert custom.model.decode_head.num_classes == len(custom.classes) == 2
    drop = {'tiny': 0.1, 'xsmall': 0.1, 'small': 0.2, 'base': 0.4}[variant]
    assert ade.model.backbone.model_name == f'mpvit_{variant}' and ade.model.backbone.drop_path_rate == drop
    assert ade.model.backbone.init_cfg.checkpoint == model_zoo.get(f'mpvit_{variant}').zoo_name
    paper_row = importlib.import_module('mpvit.eval_results').paper_row
    assert (paper_row('mmseg', str(CONFIGS / f'upernet_mpvit_{variant}_160k_ade20k.py')) is None) == (
        variant in ('tiny', 'xsmall'))
    if variant in ('small', 'base'):
        return  # built in test_released_layout_and_parameter_count
    cfg = _model_cfg(variant)
    model = MODELS.build(cfg.model).eval()
    channels = {'tiny': [96, 176, 216, 216], 'xsmall': [128, 192, 256, 256]}[variant]
    assert model.backbone.out_channels == channels == list(cfg.model.decode_head.in_channels)
    assert cfg.model.auxiliary_head.in_channels == channels[cfg.model.auxiliary_head.in_index]
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 64, 64))
        assert [f.shape[1] for f in features] == channels
        assert model.decode_head(features).shape == (1, 150, 16, 16)
        assert model.auxiliary_head(features).shape == (1, 150, 4, 4)


def test_evaluation_warns_when_most_classes_have_no_labels(capsys):
    """3-class labels under the 150 ADE20K classes: mIoU over the few classes present, and a warning naming how
    many have no labelled pixel (it used to be mIoU 0 and 148 NaN rows without a word)."""
    import torch
    from mmengine.logging import MMLogger

    from mpvit.mmseg import CheckedIoUMetric

    MMLogger.get_instance('test_classes_without_labels')  # the current logger, writing to this test's stdout
    metric = CheckedIoUMetric(iou_metrics=['mIoU'])
    metric.dataset_meta = {'classes': [f'c{i}' for i in range(150)]}
    area = torch.zeros(150, dtype=torch.float64)
    present = area.clone()
    present[:2] = 100.0
    metrics = metric.compute_metrics([(present / 2, present, present, present), (area, area, area, area)])
    assert metrics['classes_without_labels'] == 148 and metrics['mIoU'] == 50.0
    assert re.search(r'148 of 150 classes have no labelled pixel in the 2 evaluated images \(e\.g\. c2, c3',
                     capsys.readouterr().out)
    full = metric.compute_metrics([(torch.ones(150), torch.ones(150), torch.ones(150), torch.ones(150))])
    assert full['classes_without_labels'] == 0 and 'no labelled pixel' not in capsys.readouterr().out


def test_batch_paths_kwarg_installs_the_batched_stages():
    """``model.backbone.batch_paths='always'`` builds the backbone with batched stages; by default per-path."""
    from mpvit.models.batched_paths import BatchedMHCAStage
    from mpvit.models.mpvit import MHCAStage

    for value, kind in (('always', BatchedMHCAStage), ('auto', MHCAStage)):
        backbone = MODELS.build(dict(type='MPViT', model_name='tiny', batch_paths=value))
        assert {type(m) for m in backbone.modules() if isinstance(m, MHCAStage)} == {kind}
