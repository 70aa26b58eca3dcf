"""One adapter face (issue #34): every adapter takes the same arguments under the same names and builds the
core model through :func:`mpvit.models.create_features`; every loader has one signature."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import mpvit
from mpvit.models import create_features
from mpvit.models.batched_paths import BatchedMHCAStage

FACE = ('model_name', 'out_indices', 'in_chans', 'norm_layer', 'drop_path_rate', 'fast_ops', 'batch_paths')
ARGS = dict(model_name='mpvit_tiny', out_indices=('stem.1', 1, 3), in_chans=4, drop_path_rate=0.1, fast_ops=False,
            batch_paths='always')


def _adapters():
    """(name, class, its norm spelling for BatchNorm2d, the core model inside an instance)."""
    pytest.importorskip('detectron2')
    pytest.importorskip('mmseg')
    pytest.importorskip('transformers')
    from mpvit.d2 import D2MPViT
    from mpvit.deformable_detr import DeformableDetrMPViTBackbone
    from mpvit.mmseg import MMSegMPViT

    return [('detectron2', D2MPViT, 'BN'), ('mmseg', MMSegMPViT, dict(type='BN', requires_grad=True)),
            ('deformable_detr', DeformableDetrMPViTBackbone, nn.BatchNorm2d)]


def test_every_adapter_takes_the_face_arguments_by_the_same_names():
    for name, adapter, _ in _adapters():
        params = inspect.signature(adapter).parameters
        assert [p for p in FACE if p not in params] == [], name
        assert list(params)[:2] == ['model_name', 'out_indices'], name  # the two positional ones, in this order
    assert list(inspect.signature(create_features).parameters)[:len(FACE)] == list(FACE)


def test_every_adapter_builds_the_core_the_builder_builds():
    torch.manual_seed(0)
    reference = create_features(**ARGS).eval()
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    for name, adapter, norm in _adapters():
        built = adapter(**ARGS, norm_layer=norm).eval()
        core = built.backbone
        assert core.in_chans == 4 and not core.fast_ops, name
        assert all(type(stage) is BatchedMHCAStage for stage in core.mhca_stages), name
        assert all(type(m) is nn.BatchNorm2d for m in core.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
        rates = [m.drop_prob for m in core.modules() if type(m).__name__ == 'DropPath']
        assert rates and max(rates) == pytest.approx(0.1), name
        assert core.state_dict().keys() == reference.model.state_dict().keys(), name
        core.load_state_dict(reference.model.state_dict())
        with torch.no_grad():
            got = built(x)
        maps = list(got.values()) if isinstance(got, dict) else list(got)
        assert [m.shape for m in maps] == [m.shape for m in expected], name
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(maps, expected)), name


def test_a_bad_level_or_variant_is_one_line_in_every_adapter():
    for name, adapter, norm in _adapters():
        for bad, match in (
                (dict(out_indices=(4,)), r"out_indices \(4,\): levels are stage indices 0..3"),
                (dict(out_indices=()), 'out_indices'),
                (dict(out_indices=('stem.2', 0)), "'stem.2'"),
                (dict(out_indices=(1, 1, 2)), r'out_indices \(1, 1, 2\) names a level twice'),
                (dict(out_indices=(-1, 3)), 'names a level twice'),
                (dict(model_name='mpvit_huge'), "'mpvit_huge' is not an MPViT variant")):
            with pytest.raises(mpvit.UserError, match=match) as error:
                adapter(**{**ARGS, **bad}, norm_layer=norm)
            assert '\n' not in str(error.value), name


def test_mmseg_configs_with_the_former_argument_names_still_build():
    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS

    import mpvit.mmseg  # noqa: F401

    with pytest.warns(FutureWarning, match="'arch' is now 'model_name', 'norm_cfg' is now 'norm_layer', "
                                           "'in_channels' is now 'in_chans'"):
        old = MODELS.build(dict(type='MPViT', arch='mpvit_tiny', norm_cfg=dict(type='GN', num_groups=8),
                                in_channels=4))
    assert old.backbone.in_chans == 4 and old.out_channels == [96, 176, 216, 216]
    assert any(isinstance(m, nn.GroupNorm) for m in old.modules())
    with pytest.raises(TypeError, match="unexpected keyword argument 'depth'"):
        MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', depth=3))


def test_every_loader_has_one_signature():
    pytest.importorskip('detectron2')
    pytest.importorskip('mmseg')
    pytest.importorskip('transformers')
    from mpvit.checkpoint import load_backbone_weights
    from mpvit.d2 import load_detector_weights as load_d2
    from mpvit.deformable_detr import load_detector_weights as load_detr
    from mpvit.mmseg import load_segmentor_weights

    def face(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    expected = face(load_backbone_weights)
    assert [name for name, _, _ in expected] == ['model', 'source', 'checkpoint', 'head']
    for loader in (load_d2, load_detr, load_segmentor_weights):
        assert face(loader) == expected, loader.__module__


def test_the_backbone_loader_returns_the_classifier_it_reset(tmp_path):
    import timm

    source = timm.create_model('mpvit_tiny', num_classes=10)
    path = tmp_path / 'ten.pth'
    torch.save({'model': source.state_dict()}, path)
    assert mpvit.load_backbone_weights(timm.create_model('mpvit_tiny', num_classes=10), str(path)) == []
    five = timm.create_model('mpvit_tiny', num_classes=5)
    with pytest.raises(mpvit.CheckpointError, match=r"ten.pth: .*10 classes\) does not fit the model's \(5 classes"):
        mpvit.load_backbone_weights(five, str(path))
    fresh = five.cls_head.cls.weight.clone()
    assert sorted(mpvit.load_backbone_weights(five, str(path), head='reset')) == ['cls_head.cls.bias',
                                                                                   'cls_head.cls.weight']
    assert torch.equal(five.cls_head.cls.weight, fresh)
    assert torch.equal(five.stem[0].conv.weight, source.stem[0].conv.weight)


def _upernet_tiny_cfg():
    """The UperNet MPViT-T config with BN for SyncBN (one process) and no pretrained init."""
    from mmengine.config import Config
    from mmseg.utils import register_all_modules

    import mpvit.mmseg  # noqa: F401

    register_all_modules()
    cfg = Config.fromfile('configs/semantic_segmentation/upernet_mpvit_tiny_160k_ade20k.py')
    cfg.model.backbone.pop('init_cfg')
    cfg.model.backbone.norm_layer = dict(type='BN', requires_grad=True)
    for part in ('decode_head', 'auxiliary_head'):
        cfg.model[part].norm_cfg = dict(type='BN', requires_grad=True)
    return cfg


def test_the_segmentor_loader_resets_class_layers_only_when_asked(tmp_path):
    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS

    from mpvit.errors import CheckpointError
    from mpvit.mmseg import load_segmentor_weights

    cfg = _upernet_tiny_cfg()
    ade = MODELS.build(cfg.model)
    for part in ('decode_head', 'auxiliary_head'):
        cfg.model[part].num_classes = 4
    ours = MODELS.build(cfg.model)
    checkpoint = {'state_dict': ade.state_dict()}
    with pytest.raises(CheckpointError, match=r'^ade.pth does not fit .*decode_head.conv_seg.weight'):
        load_segmentor_weights(ours, 'ade.pth', checkpoint=checkpoint)
    left = load_segmentor_weights(ours, 'ade.pth', checkpoint=checkpoint, head='reset')
    assert sorted(left) == ['auxiliary_head.conv_seg.bias', 'auxiliary_head.conv_seg.weight',
                            'decode_head.conv_seg.bias', 'decode_head.conv_seg.weight']
    stem = 'backbone.stem.0.conv.weight'
    assert torch.equal(ours.state_dict()[stem], ade.state_dict()[stem])
    assert load_segmentor_weights(ade, 'ade.pth', checkpoint=checkpoint) == []


def test_mmseg_former_and_new_names_set_differently_are_one_line():
    """A config that inherits an old base and sets a new name on top (or the other way) must not build the old
    value silently; the same value under both names is fine."""
    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS

    import mpvit.mmseg  # noqa: F401

    with pytest.raises(mpvit.UserError, match=r"arch='mpvit_xsmall' and model_name='mpvit_tiny' are both set"):
        MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', arch='mpvit_xsmall'))
    with pytest.raises(mpvit.UserError, match='norm_cfg=.* and norm_layer=.* both set'):
        MODELS.build(dict(type='MPViT', norm_layer=dict(type='GN', num_groups=8), norm_cfg=dict(type='BN')))
    with pytest.warns(FutureWarning):
        same = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', arch='mpvit_tiny'))
    assert same.out_channels == [96, 176, 216, 216] and same.model_name == 'mpvit_tiny'
    with pytest.warns(FutureWarning), pytest.raises(mpvit.UserError, match=r"^model.backbone.arch 'mpvit_huge'"):
        MODELS.build(dict(type='MPViT', arch='mpvit_huge'))
    assert MODELS.build(dict(type='MPViT')).model_name == 'mpvit_small'  # the default variant


def test_unsorted_and_last_n_levels_describe_the_maps_returned():
    """The maps come by depth whatever order out_indices gives; feature_info / channels follow the maps."""
    import timm

    features = timm.create_model('mpvit_tiny', features_only=True, out_indices=(3, 1)).eval()
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [176, 216]
    assert features.feature_info.reduction() == [8, 32]
    for name, adapter, norm in _adapters():
        built = adapter('mpvit_tiny', 2, norm_layer=norm).eval()  # timm's int: the last two stages
        with torch.no_grad():
            got = built(torch.randn(1, 3, 64, 64))
        maps = list(got.values()) if isinstance(got, dict) else list(got)
        assert [m.shape[-1] for m in maps] == [4, 2], name


def test_the_deformable_detr_builder_takes_the_adapters_levels():
    pytest.importorskip('transformers')
    from mpvit.deformable_detr import build_deformable_detr, core_model

    detr = build_deformable_detr('mpvit_tiny', num_labels=3, num_queries=5, out_indices=2, num_feature_levels=3)
    assert detr.model.backbone.model.out_indices == [2, 3]
    assert detr.model.backbone.intermediate_channel_sizes == [216, 216]
    assert core_model(detr).in_chans == 3
    with pytest.raises(mpvit.UserError, match=r'^out_indices \(1, 1, 2\) names a level twice$'):
        build_deformable_detr('mpvit_tiny', num_labels=3, num_queries=5, out_indices=(1, 1, 2))


def test_detectron2_names_and_norms_are_checked_in_the_adapter():
    pytest.importorskip('detectron2')
    from mpvit.d2 import D2MPViT

    assert list(D2MPViT('mpvit_tiny', ['stage3', 0]).output_shape()) == ['stage2', 'stage3']
    with pytest.raises(mpvit.UserError, match=r"D2MPViT out_indices 'stage6': levels are named stage1, stem, "):
        D2MPViT('mpvit_tiny', ['stage6'])
    with pytest.raises(mpvit.UserError, match="^D2MPViT norm_layer 'LN' is not one of"):
        D2MPViT('mpvit_tiny', norm_layer='LN')


def _task_models():
    """(name, a small model of the task, its loader, the prefix of its backbone's keys)."""
    pytest.importorskip('detectron2')
    pytest.importorskip('mmseg')
    pytest.importorskip('transformers')
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from mmseg.registry import MODELS

    from mpvit.d2 import add_mpvit_config
    from mpvit.d2 import load_detector_weights as load_d2
    from mpvit.deformable_detr import build_deformable_detr
    from mpvit.deformable_detr import load_detector_weights as load_detr
    from mpvit.mmseg import load_segmentor_weights

    cfg = get_cfg()
    add_mpvit_config(cfg)
    cfg.merge_from_file('configs/detectron2/mask_rcnn_mpvit_tiny_1x.yaml')
    cfg.merge_from_list(['MODEL.DEVICE', 'cpu', 'MODEL.MPVIT.NORM', 'BN', 'MODEL.WEIGHTS', ''])
    seg = _upernet_tiny_cfg()
    return [('detectron2', build_model(cfg), load_d2, 'backbone.bottom_up.backbone.'),
            ('mmseg', MODELS.build(seg.model), load_segmentor_weights, 'backbone.'),
            ('deformable_detr', build_deformable_detr('mpvit_tiny', num_labels=5, num_queries=10), load_detr,
             'model.backbone.model.backbone.')]


def test_every_task_loader_means_the_same_by_head(tmp_path):
    """'require' (evaluating) refuses a backbone-only file in one line; 'reset' (fine-tuning) fills the backbone
    from it and returns everything else as left at its initial values; the caller's checkpoint is not changed."""
    import timm

    torch.manual_seed(0)
    classifier = timm.create_model('mpvit_tiny').state_dict()
    path = tmp_path / 'classifier.pth'
    torch.save({'model': classifier}, path)
    for name, model, load, prefix in _task_models():
        with pytest.raises(mpvit.CheckpointError, match='backbone weights only|no decode head|decode_head') as error:
            load(model, str(path))
        assert '\n' not in str(error.value) and 'classifier.pth' in str(error.value), name
        checkpoint = {'model': dict(classifier)}
        left = load(model, str(path), checkpoint=checkpoint, head='reset')
        own = model.state_dict()
        assert sorted(left) == sorted(k for k in own if not k.startswith(prefix)), name
        assert torch.equal(own[prefix + 'stem.0.conv.weight'], classifier['stem.0.conv.weight']), name
        assert checkpoint['model'].keys() == classifier.keys(), name
