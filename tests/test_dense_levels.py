"""The stem's stride-2 and stride-4 maps as named feature levels beside the four stages (issue #36), in timm's
``features_only`` / ``forward_intermediates`` and in every adapter. MPViT-T with one layer per stage: the same
code paths, a fraction of the time."""
from __future__ import annotations

import pytest
import timm
import torch

import mpvit  # noqa: F401
from mpvit.errors import InvalidInputError

SHALLOW = dict(num_layers=(1, 1, 1, 1))
ALL_LEVELS = ('stem.0', 'stem.1', 0, 1, 2, 3)


@pytest.fixture(scope='module')
def plain():
    torch.manual_seed(0)
    return timm.create_model('mpvit_tiny', **SHALLOW).eval()


def test_features_only_gives_the_stem_maps_first_and_stages_unchanged(plain):
    features = timm.create_model('mpvit_tiny', features_only=True, out_indices=ALL_LEVELS, **SHALLOW).eval()
    features.model.load_state_dict(plain.state_dict(), strict=False)
    assert features.feature_info.channels() == [32, 64, 96, 176, 216, 216]
    assert features.feature_info.reduction() == [2, 4, 4, 8, 16, 32]
    assert features.feature_info.module_name() == ['stem.0', 'stem.1', 'mhca_stages.0', 'mhca_stages.1',
                                                   'mhca_stages.2', 'mhca_stages.3']
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = features(x)
        stem0 = plain.stem[0](x)
        stages = plain.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        assert torch.allclose(maps[0], stem0, atol=1e-5) and torch.allclose(maps[1], plain.stem[1](stem0), atol=1e-5)
    for m, info in zip(maps, features.feature_info.get_dicts()):
        assert m.shape[1:] == (info['num_chs'], 64 // info['reduction'], 96 // info['reduction'])
    assert all(torch.equal(a, b) for a, b in zip(maps[2:], stages))
    # forward_intermediates takes the same names, with the final map too.
    with torch.no_grad():
        final, taken = plain.forward_intermediates(x, indices=['stem.0', -1])
    assert torch.equal(taken[1], final) and taken[0].shape == (2, 32, 32, 48)
    assert [i['reduction'] for i in plain.feature_levels(['stem.1', 1])] == [4, 8]


def test_stage_indices_keep_their_meaning():
    """What users' configs and the adapters say: 0..3 are the stages (strides 4..32), -1 the last one."""
    default = timm.create_model('mpvit_tiny', features_only=True, **SHALLOW)
    assert default.feature_info.channels() == [96, 176, 216, 216]
    assert default.feature_info.reduction() == [4, 8, 16, 32] and default.feature_info.out_indices == (0, 1, 2, 3)
    last = timm.create_model('mpvit_tiny', features_only=True, out_indices=(-1,), **SHALLOW)
    assert last.feature_info.reduction() == [32] and len(last.model.mhca_stages) == 4
    only_stem = timm.create_model('mpvit_tiny', features_only=True, out_indices=('stem.0',), **SHALLOW).eval()
    assert len(only_stem.model.mhca_stages) == 0  # nothing after the stem is run or kept
    assert [m.shape for m in only_stem(torch.zeros(1, 3, 64, 64))] == [(1, 32, 32, 32)]


def test_unknown_level_and_other_wrappers_are_one_line_errors():
    with pytest.raises(InvalidInputError, match="level 'stem'.*stem.0, stem.1"):
        timm.create_model('mpvit_tiny', features_only=True, out_indices=('stem', 0), **SHALLOW)
    with pytest.raises(InvalidInputError, match="feature_cls='hook'"):
        timm.create_model('mpvit_tiny', features_only=True, out_indices=('stem.0', 1), feature_cls='hook')


def test_detectron2_backbone_names_the_stem_levels():
    pytest.importorskip('detectron2')
    from mpvit.d2 import D2MPViT

    backbone = D2MPViT('mpvit_tiny', out_indices=['stage5', 'stem', 'stage1', 'stage2']).eval()
    shapes = backbone.output_shape()
    assert list(shapes) == ['stage1', 'stem', 'stage2', 'stage5']
    assert [(s.channels, s.stride) for s in shapes.values()] == [(32, 2), (64, 4), (96, 4), (216, 32)]
    with torch.no_grad():
        maps = backbone(torch.zeros(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in maps.items()} == {
        'stage1': (32, 32, 32), 'stem': (64, 16, 16), 'stage2': (96, 16, 16), 'stage5': (216, 2, 2)}


def test_mmseg_and_deformable_detr_backbones_take_the_stem_levels():
    pytest.importorskip('mmseg')
    from mmseg.registry import MODELS

    import mpvit.mmseg  # noqa: F401
    from mpvit.deformable_detr.backbone import DeformableDetrMPViTBackbone

    seg = MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', out_indices=('stem.0', 0, 3))).eval()
    assert seg.out_channels == [32, 96, 216]
    with torch.no_grad():
        assert [tuple(m.shape[1:]) for m in seg(torch.zeros(1, 3, 64, 64))] == [(32, 32, 32), (96, 16, 16),
                                                                               (216, 2, 2)]
    with pytest.raises(InvalidInputError, match='stem.0, stem.1'):
        MODELS.build(dict(type='MPViT', model_name='mpvit_tiny', out_indices=('stem.2', 0)))
    detr = DeformableDetrMPViTBackbone('mpvit_tiny', out_indices=('stem.1', 1, 2, 3))
    assert detr.channels == [64, 176, 216, 216]


def test_deformable_detr_takes_a_stem_level():
    """transformers' TimmBackboneConfig takes integer indices only: the stem level's input projection is added."""
    pytest.importorskip('transformers')
    from mpvit.deformable_detr import build_deformable_detr

    model = build_deformable_detr('mpvit_tiny', num_labels=3, num_queries=10, num_feature_levels=5,
                                  out_indices=('stem.1', 1, 2, 3)).eval()
    assert [proj[0].in_channels for proj in model.model.input_proj] == [64, 176, 216, 216, 216]
    assert [proj[0].stride for proj in model.model.input_proj][-1] == (2, 2)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(1, 3, 64, 64))
    assert out.logits.shape == (1, 10, 3) and torch.isfinite(out.pred_boxes).all()
    with pytest.raises(InvalidInputError, match='at least one stage'):
        build_deformable_detr('mpvit_tiny', out_indices=('stem.0',))


def test_readme_table_gives_every_variants_channels_and_strides():
    from helpers import REPO

    rows = [line.split('|')[1:-1] for line in (REPO / 'README.md').read_text().splitlines()
            if line.startswith("| `'stem.") or line.startswith('| `') and line[3:4].isdigit()]
    levels = [eval(row[0].strip(' `')) for row in rows]  # noqa: S307  ('stem.0' or an index, from our README)
    assert levels == list(ALL_LEVELS)
    for column, variant in enumerate(('tiny', 'xsmall', 'small', 'base'), start=2):
        model = timm.create_model(f'mpvit_{variant}', device='meta', num_classes=0)
        info = model.feature_levels(levels)
        assert [int(row[column]) for row in rows] == [i['num_chs'] for i in info], variant
        assert [int(row[1]) for row in rows] == [i['reduction'] for i in info]
