"""hubconf.py: torch.hub's entry points are timm's models, weights and keyword arguments."""
from __future__ import annotations

import timm
import torch
from helpers import REPO

import mpvit  # noqa: F401


def test_torch_hub_local_entry_points(tmp_path):
    model = torch.hub.load(str(REPO), 'mpvit_tiny', source='local', num_classes=3)
    assert type(model).__name__ == 'MPViT' and model.num_classes == 3
    features = torch.hub.load(str(REPO), 'mpvit_xsmall', source='local', features_only=True)
    assert [f.shape[1] for f in features(torch.zeros(1, 3, 64, 64))] == [128, 192, 256, 256]
    # pretrained=True reads a checkpoint as timm does (a local file here: no network in the tests).
    torch.manual_seed(0)
    reference = timm.create_model('mpvit_tiny')
    torch.save({'model': reference.state_dict()}, tmp_path / 'mpvit_tiny.pth')
    loaded = torch.hub.load(str(REPO), 'mpvit_tiny', source='local', pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(tmp_path / 'mpvit_tiny.pth')))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), reference.eval()(x))


def test_readme_gives_the_real_hub_path_and_tracker():
    """No placeholder owner: this repository has no public address, so torch.hub loads a checkout; issue numbers
    of this repository's tracker say so (the authors' are youngwanLEE/MPViT#N)."""
    import re

    readme = (REPO / 'README.md').read_text()
    assert '<owner>/<repo>' not in readme and "torch.hub.load('/path/to/this/checkout', 'mpvit_small', source='local'" \
        in readme
    assert not re.findall(r"(?<!this repository's )issue #\d+", readme)
    assert 'https://github.com/youngwanLEE/MPViT/issues' in readme
