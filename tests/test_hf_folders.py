"""Folders of tools/export_hub.py load with timm (``local-dir:``, ``hf-hub:``) and transformers (``TimmWrapper``,
``TimmBackbone``) at the pinned versions, with the same outputs (issue #36). The Hub is read offline from a
cache holding the folder, as a download leaves it."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from helpers import hub_cache, load_script, offline_hub

import mpvit  # noqa: F401

transformers = pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """An MPViT-T classification checkpoint (random weights) through export_hub, and its model."""
    root = tmp_path_factory.mktemp('hf')
    torch.manual_seed(0)
    model = timm.create_model('mpvit_tiny').eval()
    torch.save({'model': model.state_dict()}, root / 'mpvit_tiny.pth')
    out = load_script('tools/export_hub.py').main(['mpvit_tiny', '--weights', str(root / 'mpvit_tiny.pth'), '--out',
                                                  str(root / 'hub'), '--hub-id', 'someone/mpvit_tiny.in1k'])
    return out, model


def test_folder_files_config_and_card(exported):
    out, _ = exported
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        name: 0o666 & ~umask for name in ('README.md', 'config.json', 'model.safetensors')}
    config = json.loads((out / 'config.json').read_text())
    assert config['num_classes'] == 1000 and 'num_classes' not in config.get('model_args', {})
    card = (out / 'README.md').read_text()
    assert '`import mpvit`' in card and 'features_only=True' in card and "'stem.0'" in card
    assert "AutoModelForImageClassification.from_pretrained('someone/mpvit_tiny.in1k')" in card


def test_timm_loads_the_folder_locally_and_from_the_hub(exported, tmp_path, monkeypatch):
    out, model = exported
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(timm.create_model(f'local-dir:{out}', pretrained=True).eval()(x), expected)
        offline_hub(monkeypatch, hub_cache(tmp_path / 'cache', 'someone/mpvit_tiny.in1k', out))
        assert torch.equal(timm.create_model('hf-hub:someone/mpvit_tiny.in1k', pretrained=True).eval()(x), expected)


def test_transformers_loads_the_folder(exported, tmp_path):
    """At the pinned versions the unedited folder failed: "multiple values for keyword argument 'num_classes'"."""
    from safetensors.torch import load_file
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, TimmBackbone

    out, model = exported
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        classifier = AutoModelForImageClassification.from_pretrained(str(out)).eval()
        assert torch.equal(classifier(pixel_values=x).logits, model(x))
        assert classifier.config.id2label[0] == 'n01440764'  # timm's label_names: the synsets
        pooled = AutoModel.from_pretrained(str(out)).eval()(pixel_values=x).pooler_output
        assert torch.equal(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
        backbone = TimmBackbone.from_pretrained(f'local-dir:{out}', out_indices=(0, 1, 2, 3)).eval()
        assert backbone.channels == [96, 176, 216, 216]
        maps = backbone(pixel_values=x).feature_maps
        expected = model.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(maps, expected))
        # A TimmBackbone saved with save_pretrained: transformers' from_pretrained takes the folder for a timm
        # model name; README's route, its config and weights, rebuilds it.
        backbone.save_pretrained(tmp_path / 'saved')
        with pytest.raises(ValueError, match='no source prefix'):  # timm's answer to a model name that is a path
            TimmBackbone.from_pretrained(str(tmp_path / 'saved'))
        again = AutoBackbone.from_config(AutoConfig.from_pretrained(tmp_path / 'saved'))
        again.load_state_dict(load_file(tmp_path / 'saved' / 'model.safetensors'))
        assert all(torch.equal(a, b) for a, b in zip(again.eval()(pixel_values=x).feature_maps, expected))
