"""Deformable DETR + MPViT on transformers: fidelity to the original, recipe settings, loss, training end to end."""
from __future__ import annotations

import importlib
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fidelity import compare, golden, synth_input, synth_state_dict
from helpers import assert_scores, free_port, load_script

pytest.importorskip('transformers')
import timm  # noqa: E402

from mpvit import CheckpointError  # noqa: E402
from mpvit.deformable_detr import (  # noqa: E402
    BACKBONE_KEY,
    build_deformable_detr,
    convert_original_state_dict,
    core_model,
    load_detector_weights,
    param_groups,
    reset_deformable_attention,
    weighted_loss,
)
from mpvit.demo_data import write_shapes_coco  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MANIFEST = 'manifest_deformable_detr_mpvit_small.json'


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """A checkpoint in the original repository's layout, synthetic weights of the fidelity recipe."""
    path = tmp_path_factory.mktemp('released') / 'deformable_detr_mpvit_small.pth'
    torch.save({'model': synth_state_dict(golden(MANIFEST)['tensors']), 'epoch': 49}, path)
    return path


def test_parameters_heads_and_norms_match_the_reference():
    model = build_deformable_detr('mpvit_small')
    assert model.num_parameters(only_trainable=True) == golden(MANIFEST)['params_trainable'] == 34_448_361
    # Plain Deformable DETR: one class / box head for all six decoder layers.
    assert all(head is model.class_embed[0] for head in model.class_embed)
    assert all(head is model.bbox_embed[0] for head in model.bbox_embed)
    assert not model.config.tie_word_embeddings
    # The backbone wraps the core model, as every adapter does.
    assert type(core_model(model)).__name__ == 'MPViT' and model.model.backbone.model.backbone is core_model(model)
    # The backbone keeps trainable BatchNorm (transformers would have frozen it).
    norms = [m for m in core_model(model).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad for m in norms)
    assert not any('Frozen' in type(m).__name__ for m in model.modules())
    # The original's head initialisation.
    assert torch.allclose(model.class_embed[0].bias, torch.full((91,), -math.log(99)))
    last = model.bbox_embed[0].layers[-1]
    assert not last.weight.any() and last.bias.tolist() == [0, 0, -2, -2]
    assert model.config.class_cost == 2 and model.config.bbox_cost == 5 and model.config.giou_cost == 2


def test_original_layout_converts_key_for_key():
    shapes = golden(MANIFEST)['tensors']
    original = {k: torch.empty(s) for k, s in shapes.items()}
    converted = convert_original_state_dict(original)
    own = build_deformable_detr('mpvit_small').state_dict()
    assert {k: list(v.shape) for k, v in converted.items()} == {k: list(v.shape) for k, v in own.items()}
    with pytest.raises(CheckpointError, match='1 keys .* no place .*: transformer.enc_output.weight'):
        convert_original_state_dict({**original, 'transformer.enc_output.weight': torch.zeros(1)})


def test_fidelity_against_reference(released):
    model = build_deformable_detr('mpvit_small').eval()
    load_detector_weights(model, 'checkpoint', checkpoint=torch.load(released, weights_only=True))
    ref = golden('dd_mpvit_small_256x320.json')
    x = synth_input(**ref['input'])
    mask = torch.ones(1, x.shape[2], x.shape[3], dtype=torch.long)
    with torch.no_grad():
        out = model(pixel_values=x, pixel_mask=mask)
    assert not compare(ref['outputs']['pred_logits'], out.logits)
    assert not compare(ref['outputs']['pred_boxes'], out.pred_boxes)
    with torch.no_grad():  # the check can fail: a decoder layer's self-attention value projection matters
        model.model.decoder.layers[3].self_attn.v_proj.weight.mul_(1.05)
        assert compare(ref['outputs']['pred_logits'], model(pixel_values=x, pixel_mask=mask).logits)


def test_checkpoint_errors_and_backbone_init(tmp_path):
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    classifier = timm.create_model('mpvit_tiny')
    left = load_detector_weights(model, 'checkpoint', checkpoint={'model': classifier.state_dict()}, head='reset')
    loaded = core_model(model).state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith('cls_head.'):
            assert torch.equal(loaded[key], value)
    assert left and not any(k.startswith('model.backbone.') for k in left)
    with pytest.raises(CheckpointError, match='does not fit'):  # MPViT-S weights into MPViT-T
        load_detector_weights(model, 'small.pth', checkpoint={'model': synth_state_dict(golden(MANIFEST)['tensors'])})
    with pytest.raises(ValueError, match="'mpvit_huge' is not an MPViT variant"):
        build_deformable_detr('mpvit_huge')


def test_weights_that_are_none_are_refused_head_and_backbone(tmp_path, released):
    """NaN, integer and meta tensors used to load (cast, or a torch traceback) and predict nothing."""
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    state = model.state_dict()
    head = next(k for k in state if k.startswith('class_embed.') and k.endswith('.weight'))
    for key, bad, match in ((head, torch.full_like(state[head], float('nan')), 'non-finite values'),
                            (head, state[head].long(), "is torch.int64 where the model's torch.float32 belongs"),
                            (head, torch.empty(state[head].shape, device='meta'), 'is a meta tensor')):
        for head in ('require', 'reset'):  # --eval / --resume, and --pretrained (fine-tuning)
            with pytest.raises(CheckpointError, match=rf'{re.escape(key)} .*{match}'):
                load_detector_weights(model, 'bad.pth', checkpoint={'model': {**state, key: bad}}, head=head)
    original = torch.load(released, weights_only=True)['model']
    key = next(k for k in original if k.startswith('transformer.') and k.endswith('.weight'))
    torch.save({'model': {**original, key: original[key].int()}}, tmp_path / 'int.pth')
    with pytest.raises(CheckpointError, match=r'int.pth: \S+ is torch.int32 where a floating-point one belongs'):
        load_script('tools/convert_deformable_detr.py').main([str(tmp_path / 'int.pth'), str(tmp_path / 'c.pth')])
    assert not list(tmp_path.glob('c.*'))


def _layouts(weights):
    """The same backbone weights in every released wrapper, with another task's head beside them."""
    return {
        'classification': {'model': weights},
        'detectron2': {'model': {**{'backbone.bottom_up.backbone.' + k: v for k, v in weights.items()},
                                 'roi_heads.box_predictor.cls_score.weight': torch.zeros(81, 1024)}},
        'mmseg': {'state_dict': {**{'backbone.' + k: v for k, v in weights.items()},
                                 'decode_head.conv_seg.weight': torch.zeros(150, 512, 1, 1)}},
        'deformable detr backbone': {'model': {'backbone.0.backbone.' + k: v for k, v in weights.items()}},
        'timm wrapper': {'timm_model.' + k: v for k, v in weights.items()},
    }


def test_backbone_weights_of_every_layout_go_through_the_shared_extractor():
    """Backbone-only checkpoints fill the wrapped core model through mpvit.checkpoint.checkpoint_filter_fn:
    any adapter's layout, other tasks' heads and the classifier left out, misfits refused in one line."""
    from timm.models import adapt_input_conv

    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    heads = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(BACKBONE_KEY)}
    classifier = timm.create_model('mpvit_tiny').state_dict()
    for layout, checkpoint in _layouts(classifier).items():
        with torch.no_grad():  # a stale load cannot pass: each layout brings other values (shared tensors)
            for value in classifier.values():
                if value.is_floating_point():
                    value.add_(1.0)
        left = load_detector_weights(model, 'checkpoint', checkpoint=checkpoint, head='reset')
        loaded = core_model(model).state_dict()
        assert set(loaded) == {k for k in classifier if not k.startswith('cls_head.')}, layout
        for key, value in loaded.items():
            assert torch.equal(value, classifier[key]), (layout, key)
        assert set(left) == set(heads), layout
    for key, value in model.state_dict().items():  # the detector's own parts untouched
        if key in heads:
            assert torch.equal(value, heads[key]), key

    # timm adapts an RGB stem to other input channels, not the other way: a 1-channel one is refused, named.
    grey = timm.create_model('mpvit_tiny', in_chans=1).state_dict()
    assert adapt_input_conv(3, grey['stem.0.conv.weight']).shape[1] == 1
    with pytest.raises(CheckpointError, match=r'^grey.pth: backbone weights: .*stem.0.conv.weight \(checkpoint '
                                              r'\(32, 1, 3, 3\), model \(32, 3, 3, 3\)\)'):
        load_detector_weights(model, 'grey.pth', checkpoint={'model': grey}, head='reset')
    with pytest.raises(CheckpointError, match=r'^small.pth: backbone weights: .*does not fit'):  # MPViT-S into -T
        load_detector_weights(model, 'small.pth', checkpoint={'model': timm.create_model('mpvit_small').state_dict()},
                              head='reset')


def test_checkpoint_of_the_previous_layout_loads():
    """Our checkpoints from before the backbone became a wrapper (core model at model.backbone.model.*)."""
    torch.manual_seed(1)
    source = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10).state_dict()
    old = {k.replace(BACKBONE_KEY, 'model.backbone.model.'): v for k, v in source.items()}
    assert not any(k.startswith(BACKBONE_KEY) for k in old)
    torch.manual_seed(2)
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    assert load_detector_weights(model, 'checkpoint', checkpoint={'model': old}) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key


def test_deformable_attention_init_is_the_originals():
    """Our reset of transformers' deformable attention = the original MSDeformAttn._reset_parameters, checked
    against transformers' own (private) _init_weights on the same seed: directions on the unit square's edge,
    scaled by point index, on every level; zero offsets' weight and attention weights; xavier projections."""
    import copy

    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention,
    )

    torch.manual_seed(0)
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    attentions = [m for m in model.modules() if isinstance(m, DeformableDetrMultiscaleDeformableAttention)]
    assert len(attentions) == 12  # 6 encoder self-attentions, 6 decoder cross-attentions
    attn = attentions[0]
    heads, levels, points = attn.n_heads, attn.n_levels, attn.n_points
    grid = attn.sampling_offsets.bias.detach().view(heads, levels, points, 2)
    assert torch.equal(grid[0, :, :, 0], torch.arange(1., points + 1).expand(levels, points))  # head 0: +x
    assert not grid[0, :, :, 1].any()
    assert torch.allclose(grid[:, :, 0].abs().amax(-1), torch.ones(heads, levels))  # on the unit square's edge
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()

    ours, theirs = copy.deepcopy(attn), copy.deepcopy(attn)
    for p in list(ours.parameters()) + list(theirs.parameters()):
        torch.nn.init.normal_(p.data)
    torch.manual_seed(3)
    reset_deformable_attention(ours)
    torch.manual_seed(3)
    model._init_weights(theirs)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name


def test_box_count_rule_is_the_one_transformers_applies():
    """global_box_normaliser must know whether transformers already all-reduced the box count; it mirrors
    transformers' test (accelerate available and a PartialState existing). This fails when that test changes."""
    import inspect

    from transformers.loss.loss_deformable_detr import DeformableDetrImageLoss
    from transformers.loss.loss_for_object_detection import ImageLoss

    from mpvit.deformable_detr.loss import transformers_reduces_boxes

    assert DeformableDetrImageLoss.forward is ImageLoss.forward
    source = inspect.getsource(ImageLoss.forward)
    assert 'if is_accelerate_available():' in source and 'PartialState._shared_state != {}' in source
    assert transformers_reduces_boxes() is False  # nothing here created an accelerate state


def test_loss_uses_the_original_weights():
    torch.manual_seed(0)
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=20).train()
    labels = [dict(class_labels=torch.tensor([1, 3]), boxes=torch.tensor([[.3, .4, .2, .3], [.7, .6, .3, .2]])),
              dict(class_labels=torch.tensor([2]), boxes=torch.tensor([[.5, .5, .4, .4]]))]
    out = model(pixel_values=torch.randn(2, 3, 64, 96), pixel_mask=torch.ones(2, 64, 96, dtype=torch.long),
                labels=labels)
    d = out.loss_dict
    suffixes = [''] + [f'_{i}' for i in range(5)]  # last decoder layer + five auxiliary ones
    expected = sum(2 * d[f'loss_ce{s}'] + 5 * d[f'loss_bbox{s}'] + 2 * d[f'loss_giou{s}'] for s in suffixes)
    total = weighted_loss(d)
    torch.testing.assert_close(total, expected)
    # transformers' own total weighs the class loss 1: ours exceeds it by exactly the class terms.
    torch.testing.assert_close(total - out.loss, sum(d[f'loss_ce{s}'] for s in suffixes))


def test_param_groups_follow_the_original():
    model = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    rest, backbone, proj = param_groups(model, lr=2e-4, lr_backbone=2e-5)
    assert (rest['lr'], backbone['lr'], proj['lr']) == (2e-4, 2e-5, pytest.approx(2e-5))
    assert sum(p.numel() for p in backbone['params']) == sum(p.numel() for p in core_model(model).parameters())
    assert len(proj['params']) == 2 * (6 + 6) + 2  # sampling_offsets of 12 attention layers + reference_points
    total = sum(p.numel() for g in (rest, backbone, proj) for p in g['params'])
    assert total == model.num_parameters(only_trainable=True)


# ------------------------------------------------------------------------ end to end (CPU)

@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    # An odd-sized validation set: on 2 processes, DistributedSampler pads it with a repeated image.
    return write_shapes_coco(tmp_path_factory.mktemp('dd_coco'), train_images=4, val_images=3, size=(128, 96))


def _main(coco, out, *args, expect_ok=True):
    cmd = [sys.executable, str(REPO / 'deformable_detr' / 'main.py'), '-c', str(REPO / 'configs' / 'deformable_detr'
                                                                                / 'mpvit_tiny.yaml'),
           '--pretrained', '', '--coco-path', str(coco), '--train-set', 'train', '--val-set', 'val',
           '--num-classes', '5', '--num-queries', '30', '--num-workers', '0', '--print-freq', '1',
           '--train-sizes', '96', '128', '--crop-resize', '96', '112', '--crop-range', '64', '96',
           '--max-size', '160', '--test-size', '128', '--output-dir', str(out), '--device', 'cpu', *args]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert (run.returncode == 0) == expect_ok, (run.stdout + run.stderr)[-4000:]
    return run.stdout + run.stderr


def test_dataset_targets_and_padding(tmp_path):
    """The original's targets from torchvision's COCO reader: crowd and empty boxes dropped, boxes clipped to
    the image and normalised cxcywh, images without annotations kept; batches padded bottom-right."""
    from PIL import Image
    from torchvision.transforms import v2

    driver = load_script('deformable_detr/main.py')
    (tmp_path / 'img').mkdir()
    for name, size in (('a.jpg', (40, 20)), ('b.jpg', (30, 50))):
        Image.new('RGB', size, (100, 150, 200)).save(tmp_path / 'img' / name)
    anns = [
        dict(id=1, image_id=7, category_id=3, bbox=[4, 2, 10, 6]),  # no iscrowd key: optional in COCO
        dict(id=2, image_id=7, category_id=5, bbox=[30, 10, 20, 20], iscrowd=0),  # clipped to x <= 40, y <= 20
        dict(id=3, image_id=7, category_id=1, bbox=[0, 0, 5, 5], iscrowd=1),  # crowd: dropped
        dict(id=4, image_id=7, category_id=2, bbox=[45, 0, 5, 5], iscrowd=0),  # outside the image: empty, dropped
    ]
    coco = dict(images=[dict(id=7, file_name='a.jpg', width=40, height=20),
                        dict(id=9, file_name='b.jpg', width=30, height=50)],
                annotations=anns, categories=[dict(id=i, name=str(i)) for i in range(1, 6)])
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    dataset = driver.CocoDetection(tmp_path / 'img', tmp_path / 'ann.json', v2.ToDtype(torch.float32, scale=True), 10)
    image, target = dataset[0]
    assert image.shape == (3, 20, 40) and target['image_id'] == 7 and target['orig_size'] == (20, 40)
    assert target['class_labels'].tolist() == [3, 5]
    torch.testing.assert_close(target['boxes'], torch.tensor([[9 / 40, 5 / 20, 10 / 40, 6 / 20],
                                                              [35 / 40, 15 / 20, 10 / 40, 10 / 20]]))
    empty_image, empty = dataset[1]
    assert empty['image_id'] == 9 and empty['boxes'].shape == (0, 4) and empty['class_labels'].shape == (0,)
    batch = driver.collate([(image, target), (empty_image, empty)])
    assert batch['pixel_values'].shape == (2, 3, 50, 40) and batch['pixel_mask'].shape == (2, 50, 40)
    assert torch.equal(batch['pixel_values'][0, :, :20, :40], image)
    assert not batch['pixel_values'][0, :, 20:].any()
    assert batch['pixel_mask'][0].sum() == 20 * 40 and batch['pixel_mask'][0, :20, :40].all()
    assert batch['pixel_mask'][1].sum() == 50 * 30 and batch['pixel_mask'][1, :, :30].all()


@pytest.mark.slow
def test_train_eval_resume(coco, tmp_path):
    out = tmp_path / 'run'
    log = _main(coco, out, '--epochs', '1')
    assert 'epoch 0 [2/2] loss' in log and 'Average Precision  (AP) @[ IoU=0.50:0.95' in log
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    # The layout every driver's training checkpoint shares (classification's: test_classification.py).
    from mpvit.training import CHECKPOINT_KEYS
    assert saved['epoch'] == 0 and set(saved) == {*CHECKPOINT_KEYS, 'dataset_meta', 'preprocess'}
    assert saved['step'] == 2 and saved['log'] == []  # saved before its epoch's evaluation: the rows before it
    log = _main(coco, out, '--epochs', '2', '--resume', str(out / 'checkpoint.pth'))
    assert 'at epoch 1' in log and 'epoch 1 [2/2] loss' in log and 'epoch 0 [' not in log
    rows = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [row['epoch'] for row in rows] == [0, 1] and [row['step'] for row in rows] == [2, 4]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['log'] == rows[:1]
    for row in rows:
        assert_scores(row, 'test_AP', 'test_AP50')
        assert all(math.isfinite(row[f'train_{k}']) for k in ('loss', 'loss_ce', 'loss_bbox', 'loss_giou'))


@pytest.mark.slow
def test_eval_of_released_checkpoint_and_converter(coco, released, tmp_path):
    log = _main(coco, tmp_path / 'eval', '--backbone', 'mpvit_small', '--num-classes', '91', '--num-queries', '300',
                '--eval', '--resume', str(released))
    assert 'Average Precision' in log
    metrics = json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())
    assert metrics['paper_row'] == 'deformable_detr_mpvit_small' and 0.0 <= metrics['AP'] <= 100.0
    converted = tmp_path / 'converted.pth'
    run = subprocess.run([sys.executable, str(REPO / 'tools' / 'convert_deformable_detr.py'), str(released),
                          str(converted)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    model = build_deformable_detr('mpvit_small')
    model.load_state_dict(torch.load(converted, weights_only=True)['model'], strict=True)


def test_bad_dataset_path_is_named(tmp_path):
    log = _main(tmp_path, tmp_path / 'x', '--epochs', '1', expect_ok=False)
    assert f"{tmp_path / 'annotations' / 'instances_val.json'} does not exist" in log


@pytest.mark.slow
def test_torchrun_ddp_two_processes(coco, tmp_path):
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(free_port()),
           str(REPO / 'deformable_detr' / 'main.py'),
           '-c', str(REPO / 'configs' / 'deformable_detr' / 'mpvit_tiny.yaml'),
           '--pretrained', '', '--coco-path', str(coco), '--train-set', 'train', '--val-set', 'val',
           '--num-classes', '5', '--num-queries', '30', '--num-workers', '0', '--print-freq', '1', '--batch-size', '1',
           '--train-sizes', '96', '--crop-resize', '96', '--crop-range', '64', '96', '--max-size', '160',
           '--test-size', '96', '--output-dir', str(out), '--device', 'cpu', '--epochs', '1']
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert 'epoch 0 [2/2] loss' in run.stdout  # 4 images / (2 processes x 1) = 2 steps each
    assert (out / 'checkpoint.pth').is_file()
    # 3 val images on 2 ranks: the padded repeat is not counted; 100 detections per image, once each.
    metrics = json.loads((out / 'eval_metrics.json').read_text())
    assert metrics['images'] == 3 and metrics['detections'] == 300, metrics
    assert 0.0 <= metrics['AP'] <= 100.0


@pytest.mark.slow
@pytest.mark.parametrize('workers', ['0', '2'])
def test_auto_resume_equals_an_uninterrupted_run(coco, tmp_path, workers):
    """Dropout, augmentation (in this process or in workers) and shuffling: all continue as if never
    interrupted (with 0 workers, the val transform ran in this process after the RNG state was saved)."""
    common = ('--num-workers', workers, '--lr-drop', '1')
    _main(coco, tmp_path / 'a', '--epochs', '2', *common)
    _main(coco, tmp_path / 'b', '--epochs', '1', *common)
    log = _main(coco, tmp_path / 'b', '--epochs', '2', '--auto-resume', *common)
    assert 'at epoch 1' in log
    a = torch.load(tmp_path / 'a' / 'checkpoint.pth', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'checkpoint.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 1
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key


def _args(coco, out, *extra):
    return ['-c', str(REPO / 'configs' / 'deformable_detr' / 'mpvit_tiny.yaml'), '--pretrained', '',
            '--coco-path', str(coco), '--train-set', 'train', '--val-set', 'val', '--num-classes', '5',
            '--output-dir', str(out), '--device', 'cpu', *extra]


def test_bad_input_stops_before_the_model_is_built(coco, tmp_path, monkeypatch, capsys):
    main = load_script('deformable_detr/main.py')
    monkeypatch.setattr(main, 'build_deformable_detr', lambda *a, **k: pytest.fail('model built before the check'))
    with pytest.raises(ValueError, match=r'--num-classes 4 does not fit the data: .*instances_val.json has category '
                                         r'ids up to 4, so needs 5 \(leave --num-classes out to follow the data\)'):
        main.main(_args(coco, tmp_path / 'out', '--num-classes', '4'))
    (tmp_path / 'file').write_text('')
    with pytest.raises(ValueError, match='output directory .*file/out cannot be created'):
        main.main(_args(coco, tmp_path / 'file' / 'out'))
    with pytest.raises(FileNotFoundError, match='checkpoint file not found: .*nothing.pth'):
        main.main(_args(coco, tmp_path / 'out', '--resume', str(tmp_path / 'nothing.pth')))
    with pytest.raises(SystemExit):
        main.main(_args(coco, tmp_path / 'out', '--backbone', 'mpvit_huge'))
    assert '--backbone mpvit_huge: unknown model' in capsys.readouterr().err
    partial = tmp_path / 'partial'
    shutil.copytree(coco, partial)
    (partial / 'val' / '000002.jpg').unlink()
    with pytest.raises(ValueError, match=r'instances_val.json: 1 of 3 listed images are not in .*val: 000002.jpg'):
        main.main(_args(partial, tmp_path / 'out'))
    annotations = json.loads((coco / 'annotations' / 'instances_val.json').read_text())
    for edit, message in ((lambda d: d['images'][2].update(id=d['images'][0]['id']), 'ids are used more than once'),
                          (lambda d: d['annotations'][0].update(image_id=77), 'annotations point to are not')):
        edited = json.loads(json.dumps(annotations))
        edit(edited)
        (partial / 'annotations' / 'instances_val.json').write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=f'instances_val.json: .*{message}'):
            main.main(_args(partial, tmp_path / 'out'))
    for flag, value in (('--lr-drop', '0'), ('--epochs', '-1'), ('--num-queries', '0'), ('--num-feature-levels', '2')):
        with pytest.raises(SystemExit):
            main.main(_args(coco, tmp_path / 'out', flag, value))
        assert f'{flag} {value}: must be at least' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # evaluating without detector weights would score random heads
        main.main(_args(coco, tmp_path / 'out', '--eval'))
    assert '--eval needs --resume' in capsys.readouterr().err


def _edited_set(coco, root, split, edit):
    """A copy of the shapes set whose ``split`` annotations went through ``edit(dataset)``."""
    shutil.copytree(coco, root)
    path = root / 'annotations' / f'instances_{split}.json'
    dataset = json.loads(path.read_text())
    edit(dataset)
    path.write_text(json.dumps(dataset))
    return root, path


@pytest.mark.parametrize('case,split,edit,message', [
    # a head of another size trained on in silence, box AP 0.00
    ('duplicate category id', 'train', lambda d: d['categories'][1].update(id=1),
     '1 category ids are used more than once: 1; give every category its own id'),
    # trained on without the name / a KeyError traceback
    ('category without name', 'val', lambda d: d['categories'][0].pop('name'), '1 category entries without name: #0'),
    ('image without file_name', 'train', lambda d: d['images'][0].pop('file_name'),
     '1 image entries without file_name: #0 (id 1)'),
    ('NaN bbox', 'train', lambda d: d['annotations'][0].update(bbox=[1.0, float('nan'), 2.0, 2.0]),
     '1 annotations have a bbox that is not 4 finite numbers: annotation id 1 (image id 1): [1.0, nan, 2.0, 2.0]'),
    # box AP -100.00 written as a metric / box AP 0.00
    ('val set without annotations', 'val', lambda d: d.update(annotations=[]),
     'has images but no annotations: nothing to score in evaluation (COCO AP would be -1)'),
    ('val set without images', 'val', lambda d: d.update(images=[], annotations=[]),
     'lists no image: nothing to evaluate, so no score'),
    # torchvision's reader ignores EXIF orientation: sizes are the stored image's
    ('turned size', 'val', lambda d: d['images'][0].update(width=96, height=128),
     "1 images have a width / height that is not the file's: id 1 000001.jpg: json 96x128, file 128x96"),
])
def test_malformed_files_stop_before_the_model_is_built(coco, tmp_path, monkeypatch, case, split, edit, message):
    main = load_script('deformable_detr/main.py')
    monkeypatch.setattr(main, 'build_deformable_detr', lambda *a, **k: pytest.fail('model built before the check'))
    root, path = _edited_set(coco, tmp_path / 'data', split, edit)
    with pytest.raises(ValueError, match=re.escape(f'{path}: {message}')):
        main.main(_args(root, tmp_path / 'out'))


def test_missing_areas_are_filled_and_exif_is_read_as_stored(coco, tmp_path, caplog):
    """Annotations without ``area`` trained, then ended in ``KeyError: 'area'`` at evaluation: pycocotools'
    area is filled in (and counted). An EXIF-oriented JPEG is read as stored, so its stored size is right."""
    from PIL import Image
    from torchvision.transforms import v2

    driver = load_script('deformable_detr/main.py')

    def edit(dataset):
        for ann in dataset['annotations']:
            ann.pop('area')
    root, path = _edited_set(coco, tmp_path / 'data', 'val', edit)
    exif = Image.Exif()
    exif[274] = 6
    Image.new('RGB', (128, 96)).save(root / 'val' / '000002.jpg', exif=exif.tobytes())
    with caplog.at_level(logging.WARNING, logger='mpvit.data'):
        dataset = driver.CocoDetection(root / 'val', path, v2.ToDtype(torch.float32, scale=True), None)
    truth = {a['id']: a['area'] for a in json.loads((coco / 'annotations' / 'instances_val.json').read_text())
             ['annotations']}
    assert f'{path}: {len(truth)} annotations have no area: 1, 2' in caplog.text
    assert '1 images have an EXIF orientation: 000002.jpg (6); Deformable DETR (torchvision) reads it as stored' \
        in caplog.text
    for ann_id, area in truth.items():  # the polygon's pixels, close to the exact area demo_data wrote
        assert dataset.coco.anns[ann_id]['area'] == pytest.approx(area, rel=0.1)
    assert dataset[1][0].shape[-2:] == (96, 128)


def test_malformed_file_is_one_line(coco, tmp_path):
    root, path = _edited_set(coco, tmp_path / 'data', 'train', lambda d: d['categories'][1].update(id=1))
    log = _main(root, tmp_path / 'out', expect_ok=False)
    assert log.strip().splitlines()[-1].startswith(f'error: {path}: 1 category ids are used more than once: 1; ')
    assert 'Traceback' not in log


def test_missing_resume_file_is_one_line(coco, tmp_path):
    log = _main(coco, tmp_path / 'out', '--resume', str(tmp_path / 'nothing.pth'), expect_ok=False)
    assert log.strip().splitlines() == [f'error: checkpoint file not found: {tmp_path / "nothing.pth"}']


def test_divergence_stops_in_one_line_before_saving(coco, tmp_path):
    """A loss that turns non-finite used to surface as transformers' error about box format."""
    log = _main(coco, tmp_path / 'out', '--epochs', '1', '--lr', '1e30', '--lr-backbone', '1e30', expect_ok=False)
    assert re.fullmatch(r'error: training diverged: (loss is (nan|inf)|the decoder outputs are not finite) at epoch 0 '
                        r'step 2/2 \(last finite loss \S+ at epoch 0 step 1/2\); stopped before saving it.*',
                        log.strip().splitlines()[-1]), log[-3000:]
    assert 'Traceback' not in log and not (tmp_path / 'out' / 'checkpoint.pth').exists()


def test_evaluating_a_backbone_only_checkpoint_is_refused(coco, tmp_path):
    """Evaluating random heads used to print box AP 0.00 and exit 0."""
    torch.save({'model': timm.create_model('mpvit_tiny').state_dict()}, tmp_path / 'classifier.pth')
    log = _main(coco, tmp_path / 'out', '--eval', '--resume', str(tmp_path / 'classifier.pth'), expect_ok=False)
    assert log.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'classifier.pth'} is a classification checkpoint, with no Deformable DETR weights "
        "(class_embed.*): evaluating it would score randomly initialised heads; give a Deformable DETR checkpoint "
        "(use backbone weights to train one)")
    assert not (tmp_path / 'out' / 'eval_metrics.json').exists()


def test_our_detector_checkpoints_seed_every_other_adapter():
    """A detector trained here (and one saved before the backbone became a wrapper) gives its backbone to the
    shared extractor, as the released checkpoints do: classification --pretrained, Detectron2, mmseg init."""
    from mpvit.checkpoint import checkpoint_filter_fn

    detr = build_deformable_detr('mpvit_tiny', num_labels=3, num_queries=10)
    expected = core_model(detr).state_dict()
    state = detr.state_dict()
    previous = {k.replace(BACKBONE_KEY, 'model.backbone.model.'): v for k, v in state.items()}
    for checkpoint in ({'model': state}, {'model': previous}):
        weights = checkpoint_filter_fn(checkpoint, timm.create_model('mpvit_tiny', num_classes=0))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_resuming_another_drivers_checkpoint_is_refused(coco, tmp_path):
    """A classification training checkpoint has the shared keys (optimizer, lr_scheduler, epoch): resuming it
    used to load its backbone, then fail in the optimizer with a traceback."""
    from mpvit.training import CHECKPOINT_KEYS

    model = timm.create_model('mpvit_tiny')
    state = {key: {} for key in CHECKPOINT_KEYS}
    state.update(model=model.state_dict(), epoch=299, step=0, args={}, log=[])
    torch.save(state, tmp_path / 'classifier.pth')
    log = _main(coco, tmp_path / 'out', '--resume', str(tmp_path / 'classifier.pth'), expect_ok=False)
    assert log.strip().splitlines()[-1] == (
        f"error: --resume {tmp_path / 'classifier.pth'}: no Deformable DETR weights (class_embed.*) in it; --resume "
        'continues a Deformable DETR run (start from other weights with --pretrained)'), log[-2000:]


def test_unreadable_and_16_bit_images(tmp_path, caplog):
    """Training leaves an unreadable image out, named; evaluation refuses it; a set of which nothing reads is
    refused at once; a 16-bit grey PNG is scaled to 8 bits (it used to be read all white)."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import v2

    from mpvit.errors import InvalidInputError

    driver = load_script('deformable_detr/main.py')
    root = write_shapes_coco(tmp_path / 'coco', train_images=3, val_images=1, size=(64, 48))
    annotations = root / 'annotations' / 'instances_train.json'
    coco = json.loads(annotations.read_text())
    truncated = root / 'train' / coco['images'][1]['file_name']
    truncated.write_bytes(truncated.read_bytes()[:200])
    Image.fromarray(np.full((48, 64), 32768, np.uint16)).save(root / 'train' / 'grey16.png')
    coco['images'][2]['file_name'] = 'grey16.png'
    annotations.write_text(json.dumps(coco))
    to_tensor = v2.ToDtype(torch.float32, scale=True)

    def dataset(train):
        return driver.CocoDetection(root / 'train', annotations, to_tensor, 5, train=train)

    with caplog.at_level('WARNING', logger='mpvit.data'):
        samples = [dataset(True)[i] for i in range(3)]
    assert f'leaving out unreadable image {truncated}' in caplog.text
    assert [t['image_id'] for _, t in samples] == [coco['images'][i]['id'] for i in (0, 2, 2)]
    assert samples[1][0].shape == (3, 48, 64) and torch.allclose(samples[1][0], torch.tensor(128 / 255))
    with pytest.raises(InvalidInputError, match=f'unreadable image {truncated} .*evaluation needs every image'):
        dataset(False)[1]
    for image in coco['images']:
        (root / 'train' / image['file_name']).write_bytes(b'not an image')
    with pytest.raises(InvalidInputError, match=r'instances_train.json: none of its 3 images can be read'):
        dataset(True)
    (root / 'train' / 'grey16.png').write_bytes(b'')  # an empty file is refused as such, not left out
    with pytest.raises(InvalidInputError, match=r'instances_train.json: 1 image files are empty \(0 bytes\): grey16'):
        dataset(True)


# ------------------------------------------------------------------------ your own data, end to end

FRUIT = ('apple', 'pear')


def _write_fruit_coco(root: Path) -> Path:
    """A custom COCO-format set of 2 categories with names of its own (ids 1, 2), 2 train and 2 val images."""
    write_shapes_coco(root, train_images=2, val_images=2, size=(64, 48))
    for split in ('train', 'val'):
        path = root / 'annotations' / f'instances_{split}.json'
        data = json.loads(path.read_text())
        data['categories'] = [dict(id=i + 1, name=name) for i, name in enumerate(FRUIT)]
        for ann in data['annotations']:
            ann['category_id'] = 1 + (ann['category_id'] - 1) % 2
        path.write_text(json.dumps(data))
    return root


def _fruit_args(root, out, *extra):
    """Flags for a short run on the fruit set; no --num-classes: the head follows the data."""
    return ['-c', str(REPO / 'configs' / 'deformable_detr' / 'mpvit_tiny.yaml'), '--pretrained', '',
            '--coco-path', str(root), '--train-set', 'train', '--val-set', 'val', '--num-queries', '30',
            '--num-workers', '0', '--print-freq', '1', '--train-sizes', '48', '--crop-resize', '48',
            '--crop-range', '32', '48', '--max-size', '64', '--test-size', '48', '--output-dir', str(out),
            '--device', 'cpu', *extra]


@pytest.fixture(scope='module')
def fruit(tmp_path_factory):
    return _write_fruit_coco(tmp_path_factory.mktemp('fruit') / 'fruit')


@pytest.fixture(scope='module')
def fruit_run(fruit, tmp_path_factory):
    """One epoch on the fruit set through the command line, shared by the tests below."""
    out = tmp_path_factory.mktemp('fruit_run')
    run = subprocess.run([sys.executable, str(REPO / 'deformable_detr' / 'main.py'), *_fruit_args(fruit, out),
                          '--epochs', '1'], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return out, run.stdout + run.stderr


@pytest.mark.slow
def test_own_data_head_follows_the_categories(fruit_run):
    out, log = fruit_run
    assert '3 class outputs (largest category id + 1) from the categories of' in log
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert saved['model']['class_embed.0.bias'].shape == (3,)
    assert saved['dataset_meta'] == {'classes': list(FRUIT), 'category_ids': [1, 2]}
    assert saved['preprocess'] == dict(test_size=48, max_size=64, mean=[0.485, 0.456, 0.406],
                                       std=[0.229, 0.224, 0.225])
    dataset = json.loads((out / 'eval_metrics.json').read_text())['dataset']
    assert dataset['name'] == 'fruit' and dataset['split'] == 'val' and dataset['images'] == 2


@pytest.mark.slow
def test_own_data_evaluate_and_draw(fruit, fruit_run, tmp_path, capsys):
    from PIL import Image

    on_paper_dataset = importlib.import_module('mpvit.eval_results').on_paper_dataset
    from mpvit.weights import file_sha256

    out, _ = fruit_run
    driver = load_script('deformable_detr/main.py')
    stats = driver.main(_fruit_args(fruit, tmp_path / 'eval', '--eval', '--resume', str(out / 'checkpoint.pth')))
    assert_scores(stats, 'AP', 'AP50')
    metrics = json.loads((tmp_path / 'eval' / 'eval_metrics.json').read_text())
    annotations = fruit / 'annotations' / 'instances_val.json'
    assert metrics['dataset'] == dict(name='fruit', split='val', images=2, annotations=str(annotations),
                                      sha256=file_sha256(annotations), num_classes=2)
    assert not on_paper_dataset('deformable_detr', metrics['dataset'])

    demo = load_script('deformable_detr/demo.py')
    image = fruit / 'val' / '000001.jpg'
    capsys.readouterr()
    written = demo.main([str(image), '--weights', str(out / 'checkpoint.pth'), '-c',
                         str(REPO / 'configs' / 'deformable_detr' / 'mpvit_tiny.yaml'), '--threshold', '0',
                         '--output', str(tmp_path / 'demo'), '--device', 'cpu'])
    printed = capsys.readouterr().out
    png = tmp_path / 'demo' / '000001.png'
    assert written == [png] and f'wrote {png}' in printed
    assert re.search(r'^  (apple|pear) 0\.\d\d  \[', printed, re.M), printed[:2000]
    assert not re.search(r'^  class \d', printed, re.M)  # every label named
    with Image.open(png) as drawn:
        assert drawn.size == Image.open(image).size


def test_own_data_errors_are_one_line(fruit, coco, tmp_path, capsys):
    from mpvit.errors import InvalidInputError
    from mpvit.training import user_errors_in_one_line

    driver = load_script('deformable_detr/main.py')
    # A user-set class count below what the data's ids need: both numbers, before any model is built.
    with pytest.raises(InvalidInputError, match=r'--num-classes 2 does not fit the data: .*instances_val.json has '
                                                r'category ids up to 2, so needs 3'):
        driver.main(_fruit_args(fruit, tmp_path / 'out', '--num-classes', '2'))
    # A checkpoint's head that does not fit the evaluated data.
    head = {'model': {'class_embed.0.bias': torch.zeros(3), 'class_embed.0.weight': torch.zeros(3, 256)}}
    torch.save(head, tmp_path / 'three.pth')
    with pytest.raises(CheckpointError, match=r'three.pth has a class head of 3 outputs, but .*instances_val.json '
                                              r'needs 5 \(largest category id 4\)'):
        driver.main(_fruit_args(coco, tmp_path / 'out', '--eval', '--resume', str(tmp_path / 'three.pth')))
    # The demo: a missing image, a threshold outside [0, 1], an unreadable image, a missing weights file.
    demo = load_script('deformable_detr/demo.py')
    config = str(REPO / 'configs' / 'deformable_detr' / 'mpvit_tiny.yaml')
    (tmp_path / 'broken.jpg').write_bytes(b'not a picture')
    image = str(fruit / 'val' / '000001.jpg')
    for argv, line in (
            ([str(tmp_path / 'nothing.jpg')], f'error: image(s) not found: {tmp_path / "nothing.jpg"}'),
            ([image, '--threshold', '1.5'], 'error: --threshold 1.5: must be in [0, 1] (a score)'),
            ([str(tmp_path / 'broken.jpg')], f'error: unreadable image {tmp_path / "broken.jpg"} ('),
            ([image, '--weights', str(tmp_path / 'none.pth')], f'error: checkpoint file not found: '
                                                                f'{tmp_path / "none.pth"}')):
        argv = [*argv, '-c', config, '--output', str(tmp_path / 'demo')]
        with pytest.raises(SystemExit), user_errors_in_one_line():
            demo.main(argv if '--weights' in argv else [*argv, '--weights', str(tmp_path / 'three.pth')])
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(line), err


def test_fine_tuning_keeps_a_new_class_head_and_names_fall_back_to_coco():
    torch.manual_seed(0)
    coco_like = build_deformable_detr('mpvit_tiny', num_labels=91, num_queries=10)
    ours = build_deformable_detr('mpvit_tiny', num_labels=3, num_queries=10)
    fresh = ours.class_embed[0].bias.clone()
    with pytest.raises(CheckpointError, match=r'class_embed.0.bias \(checkpoint \(91,\), model \(3,\)\)'):
        load_detector_weights(ours, 'checkpoint', checkpoint={'model': coco_like.state_dict()})
    left = load_detector_weights(ours, 'coco.pth', checkpoint={'model': coco_like.state_dict()}, head='reset')
    assert left and all(k.startswith('class_embed.') for k in left)
    assert torch.equal(ours.class_embed[0].bias, fresh)
    assert torch.equal(ours.model.query_position_embeddings.weight, coco_like.model.query_position_embeddings.weight)

    demo = load_script('deformable_detr/demo.py')
    coco_names = demo.class_names({'model': {}}, 91)
    assert len(coco_names) == 80 and coco_names[1] == 'person' and coco_names[90] == 'toothbrush'
    assert demo.class_names({'dataset_meta': {'classes': ['a', 'b'], 'category_ids': [3, 7]}}, 8) == {3: 'a', 7: 'b'}
    assert demo.class_names({}, 5) == {}


def test_dataset_record_names_coco_by_its_categories(coco, tmp_path):
    from torchvision.transforms import v2

    from mpvit.coco_checks import coco_2017_names

    driver = load_script('deformable_detr/main.py')
    root = tmp_path / 'mine'
    shutil.copytree(coco, root)
    path = root / 'annotations' / 'instances_val.json'
    data = json.loads(path.read_text())
    data['categories'] = [dict(id=i, name=n) for i, n in coco_2017_names().items()]
    path.write_text(json.dumps(data))
    args = driver.get_args(['--coco-path', str(root), '--val-set', 'val'])
    val_set = driver.CocoDetection(root / 'val', path, v2.Identity(), None)
    assert val_set.label_space == 91
    assert driver.dataset_record(args, val_set)['name'] == 'coco'
    data['categories'][0]['name'] = 'human'  # COCO's ids, not its names: the user's own data
    path.write_text(json.dumps(data))
    record = driver.dataset_record(args, driver.CocoDetection(root / 'val', path, v2.Identity(), None))
    assert record['name'] == 'mine' and record['split'] == 'val' and record['images'] == 3


def test_batch_paths_flag_installs_the_batched_stages():
    """``--batch-paths always`` (a config key too) gives the backbone batched stages; by default they run per-path."""
    from mpvit.models.batched_paths import BatchedMHCAStage
    from mpvit.models.mpvit import MHCAStage

    driver = load_script('deformable_detr/main.py')
    for flag, kind in (('always', BatchedMHCAStage), ('auto', MHCAStage)):
        args = driver.get_args(['--backbone', 'mpvit_tiny', '--num-classes', '5', '--batch-paths', flag])
        model = driver.build_model(args, sync_bn=False)
        assert {type(m) for m in model.modules() if isinstance(m, MHCAStage)} == {kind}
