"""Every way of loading MPViT weights agrees: which weights of a checkpoint, what happens to a classifier
that does or does not fit, input channels, and the file checks (CPU, tiny model)."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from helpers import REPO, load_script
from PIL import Image

from mpvit import CheckpointError, load_backbone_weights

KEY = 'stem.0.conv.weight'


def _from_file(path, **kwargs):
    return timm.create_model('mpvit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


@pytest.fixture(scope='module')
def model_and_ema(tmp_path_factory):
    """A training checkpoint with different 'model' and 'model_ema' weights (the authors' DeiT-style files)."""
    torch.manual_seed(0)
    model, ema = timm.create_model('mpvit_tiny', num_classes=4), timm.create_model('mpvit_tiny', num_classes=4)
    path = tmp_path_factory.mktemp('ckpt') / 'both.pth'
    torch.save({'model': model.state_dict(), 'model_ema': ema.state_dict(), 'epoch': 299}, path)
    assert not torch.equal(model.state_dict()[KEY], ema.state_dict()[KEY])
    return path, model.state_dict()


def test_model_not_ema_through_every_loader(model_and_ema, caplog):
    path, expected = model_and_ema
    loaded = {}
    with caplog.at_level(logging.WARNING):
        loaded['timm.create_model'] = _from_file(path, num_classes=4).state_dict()[KEY]
    assert "holds 'model' and 'model_ema': loading 'model'" in caplog.text  # says which one it took
    ours = timm.create_model('mpvit_tiny', num_classes=4)
    load_backbone_weights(ours, str(path))
    loaded['load_backbone_weights'] = ours.state_dict()[KEY]

    pytest.importorskip('detectron2')
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from mpvit.d2 import MPViTCheckpointer, add_mpvit_config

    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file(str(REPO / 'configs' / 'detectron2' / 'retinanet_mpvit_tiny_1x.yaml'))
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.WEIGHTS', '', 'MODEL.MPVIT.NORM', 'BN'])
    detector = build_model(cfg)
    MPViTCheckpointer(detector).load(str(path))
    loaded['Detectron2'] = detector.backbone.bottom_up.backbone.state_dict()[KEY]

    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS

    import mpvit.mmseg  # noqa: F401

    backbone = MODELS.build(dict(type='MPViT', model_name='tiny',
                                 init_cfg=dict(type='Pretrained', checkpoint=str(path))))
    backbone.init_weights()
    loaded['mmseg init_cfg'] = backbone.state_dict()[KEY]

    pytest.importorskip('transformers')
    from mpvit.deformable_detr import build_deformable_detr, core_model, load_detector_weights

    detr = build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10)
    load_detector_weights(detr, str(path), head='reset')
    loaded['Deformable DETR'] = core_model(detr).state_dict()[KEY]

    assert len(loaded) == 5
    for loader, value in loaded.items():
        assert torch.equal(value, expected[KEY]), loader


def test_classifier_kept_when_it_fits_reset_visibly_when_not(model_and_ema, caplog):
    path, expected = model_and_ema
    fits = _from_file(path, num_classes=4)  # timm alone would drop it: 4 != the cfg's 1000 classes
    assert torch.equal(fits.state_dict()['cls_head.cls.weight'], expected['cls_head.cls.weight'])
    with caplog.at_level(logging.WARNING):
        other = _from_file(path, num_classes=10)
    assert other.get_classifier().out_features == 10
    assert 'classifier (cls_head.cls.weight, cls_head.cls.bias: 4 classes) does not fit' in caplog.text
    assert 'freshly initialised classifier' in caplog.text
    with pytest.raises(CheckpointError, match=r'both.pth: .*4 classes.*10 classes.*evaluating or resuming'):
        load_backbone_weights(timm.create_model('mpvit_tiny', num_classes=10), str(path), head='require')
    headless = _from_file(path, num_classes=0)  # no classifier asked for: nothing to warn about
    assert torch.equal(headless.state_dict()[KEY], expected[KEY])


def test_in_chans_adapts_the_stem_after_filtering(model_and_ema):
    path, expected = model_and_ema
    grey = _from_file(path, num_classes=4, in_chans=1)
    assert torch.allclose(grey.state_dict()[KEY], expected[KEY].sum(dim=1, keepdim=True))
    assert grey(torch.randn(1, 1, 64, 64)).shape == (1, 4)


def test_file_checks(model_and_ema, tmp_path):
    from safetensors.torch import save_file

    path, expected = model_and_ema
    (tmp_path / 'folder.pth').mkdir()
    with pytest.raises(CheckpointError, match='folder.pth is a directory, not a checkpoint file'):
        _from_file(tmp_path / 'folder.pth')
    tensors = {k: v.clone() for k, v in expected.items()}  # shared CPE / CRPE tensors: one copy each
    save_file(tensors, tmp_path / 'weights.pth')
    with pytest.raises(CheckpointError, match=r'weights.pth is a safetensors file under another name; rename it '
                                              r'to .*weights.safetensors'):
        _from_file(tmp_path / 'weights.pth', num_classes=4)
    save_file(tensors, tmp_path / 'weights.safetensors')
    loaded = _from_file(tmp_path / 'weights.safetensors', num_classes=4)
    assert torch.equal(loaded.state_dict()[KEY], expected[KEY])


def test_predict_prints_named_top5(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('mpvit_tiny')
    torch.save({'model': model.state_dict()}, tmp_path / 'imagenet.pth')
    Image.new('RGB', (300, 260), (200, 30, 30)).save(tmp_path / 'red.jpg')
    cmd = [sys.executable, str(REPO / 'tools' / 'predict.py'), str(tmp_path / 'red.jpg'), '--model', 'mpvit_tiny',
           '--weights', str(tmp_path / 'imagenet.pth')]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0].endswith('red.jpg') and len(lines) == 6
    # The model's own eval transform (resize 256 / crop 224, bicubic): recompute the expected top class.
    cfg = timm.data.resolve_data_config(model=model.eval())
    with torch.no_grad():
        logits = model(timm.data.create_transform(**cfg)(Image.open(tmp_path / 'red.jpg')).unsqueeze(0))
    best = int(logits.argmax())
    assert lines[1].endswith(f'{timm.data.ImageNetInfo().index_to_description(best)} '
                             f'({timm.data.ImageNetInfo().index_to_label_name(best)}) ({best})')
    # A 16-bit grey PNG is the mid-grey it shows, not clipped to white.
    Image.fromarray(np.full((260, 300), 32768, np.uint16)).save(tmp_path / 'grey16.png')
    predict = load_script('tools/predict.py')
    grey = predict.predict(predict.parse_args([str(tmp_path / 'grey16.png'), '--model', 'mpvit_tiny', '--weights',
                                               str(tmp_path / 'imagenet.pth'), '--top', '1']))[0][0]
    with torch.no_grad():
        expected = model(timm.data.create_transform(**cfg)(Image.new('RGB', (300, 260), (128,) * 3)).unsqueeze(0))
    assert grey['probability'] == pytest.approx(float(expected.softmax(-1).max()), rel=1e-4)
    # Any classifier: one of 4 classes without names is read with its own class count, named 'class <i>'.
    four = timm.create_model('mpvit_tiny', num_classes=4)
    torch.save({'model': four.state_dict()}, tmp_path / 'four.pth')
    run = subprocess.run(cmd[:-1] + [str(tmp_path / 'four.pth')], capture_output=True, text=True)
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 5 and 'class ' in run.stdout, run.stderr[-2000:]
    # A backbone-only checkpoint cannot classify: one line.
    torch.save({'model': timm.create_model('mpvit_tiny', num_classes=0).state_dict()}, tmp_path / 'backbone.pth')
    run = subprocess.run(cmd[:-1] + [str(tmp_path / 'backbone.pth')], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'has no classifier (cls_head.cls.weight)' in run.stderr
