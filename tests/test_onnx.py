"""ONNX export with both of torch's exporters, run by onnxruntime against PyTorch (tools/export_onnx.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import load_script

pytest.importorskip('onnxruntime')
pytest.importorskip('onnx')

export_onnx = load_script('tools/export_onnx.py')


@pytest.mark.parametrize('features_only', [False, True], ids=['classifier', 'features_only'])
@pytest.mark.parametrize('exporter', ['torchscript', pytest.param('dynamo', marks=pytest.mark.slow)])
def test_exported_model_equals_pytorch(tmp_path, exporter, features_only):
    """The TorchScript exporter used to drop an in-place write through a view in the factorized attention:
    logits off by up to 0.98 (features by 48.8), without a warning. The dynamo exporter traces every op (about
    10 s per layer on 2 CPU cores): MPViT-T's stages with five layers (one stage stacks two)."""
    depth = {}
    if exporter == 'dynamo':
        pytest.importorskip('onnxscript')
        depth = dict(num_layers=(1, 2, 1, 1))
    torch.manual_seed(0)
    model = export_onnx.build('mpvit_tiny', features_only=features_only, **depth)
    names = export_onnx.output_names(model, features_only)
    assert names == (['stage2', 'stage3', 'stage4', 'stage5'] if features_only else ['logits'])
    export_onnx.export(model, tmp_path / 'model.onnx', 96, names, exporter)
    assert export_onnx.max_difference(model, tmp_path / 'model.onnx', 96) < 1e-4


def test_tool_checks_and_writes(tmp_path, capsys):
    """The command: weights of a classification checkpoint, the file written only after the check."""
    import timm
    torch.manual_seed(0)
    torch.save({'model': timm.create_model('mpvit_tiny').state_dict()}, tmp_path / 'w.pth')
    difference = export_onnx.main(['mpvit_tiny', str(tmp_path / 'out' / 'm.onnx'), '--weights', str(tmp_path / 'w.pth'),
                                   '--size', '64', '--exporter', 'torchscript'])
    assert difference < 1e-4 and (tmp_path / 'out' / 'm.onnx').is_file()
    assert not list((tmp_path / 'out').glob('*.partial'))
    assert f"wrote {(tmp_path / 'out' / 'm.onnx').resolve()} (torchscript exporter" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        export_onnx.main(['mpvit_tiny', str(tmp_path / 'x.onnx'), '--size', '100'])
