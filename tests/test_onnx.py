"""ONNX export with both of torch's exporters, run by onnxruntime against PyTorch (tools/export_onnx.py)."""
from __future__ import annotations

import pytest
import torch
from helpers import load_script

pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

export_onnx = load_script('tools/export_onnx.py')


@pytest.mark.parametrize('features_only', [False, True], ids=['classifier', 'features_only'])
@pytest.mark.parametrize('exporter', ['torchscript', pytest.param('dynamo', marks=pytest.mark.slow)])
def test_exported_model_equals_pytorch(tmp_path, exporter, features_only):
    """The TorchScript exporter used to drop an in-place write through a view in the factorized attention:
    logits off by up to 0.98 (features by 48.8), without a warning. The dynamo exporter traces every op (about
    10 s per layer on 2 CPU cores): MPViT-T's stages with one layer each (the same code paths).

    Traced at 64x64, the file takes other batch sizes, heights and widths (96x128: a fixed-size graph fails
    there in onnxruntime), also sizes that are no multiple of 32 (as PyTorch, each map ceil(size / stride));
    the stem maps export as outputs of their own; it is one file of standard ai.onnx ops."""
    if exporter == 'dynamo':
        pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    levels = dict(out_indices=('stem.0', 'stem.1', 0, 1, 2, 3)) if features_only else {}
    model = export_onnx.build('mpvit_tiny', features_only=features_only, num_layers=(1, 1, 1, 1), **levels)
    names = export_onnx.output_names(model, features_only)
    expected = ['stem1', 'stem2', 'stage2', 'stage3', 'stage4', 'stage5'] if features_only else ['logits']
    assert names == expected
    export_onnx.export(model, tmp_path / 'model.onnx', (64, 64), names, exporter)
    assert [p.name for p in tmp_path.iterdir()] == ['model.onnx']
    assert export_onnx.check_shapes((64, 64))[1] == (3, 96, 128)
    assert export_onnx.max_difference(model, tmp_path / 'model.onnx', 64) < 1e-4
    assert export_onnx.max_difference(model, tmp_path / 'model.onnx', 64, shapes=[(2, 100, 130)]) < 1e-4
    graph = onnx.load(str(tmp_path / 'model.onnx'))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.graph.input) + list(graph.graph.output)}
    assert dims['images'] == ['batch', 3, 'height', 'width']
    if features_only:
        assert dims['stem1'] == ['batch', 32, 'height/2', 'width/2']
        assert dims['stage5'] == ['batch', 216, 'height/32', 'width/32']
    opset, ops, other = export_onnx.graph_ops(tmp_path / 'model.onnx')
    assert opset == 18 and other == [] and {'Conv', 'MatMul', 'Softmax', 'HardSwish'} <= set(ops)


def test_tool_checks_and_writes(tmp_path, capsys):
    """The command: weights of a classification checkpoint, the file written only after the check."""
    import timm
    torch.manual_seed(0)
    torch.save({'model': timm.create_model('mpvit_tiny').state_dict()}, tmp_path / 'w.pth')
    difference = export_onnx.main(['mpvit_tiny', str(tmp_path / 'out' / 'm.onnx'), '--weights', str(tmp_path / 'w.pth'),
                                   '--size', '64', '--exporter', 'torchscript'])
    assert difference < 1e-4 and (tmp_path / 'out' / 'm.onnx').is_file()
    assert [p.name for p in (tmp_path / 'out').iterdir()] == ['m.onnx']
    out = capsys.readouterr().out
    assert f"wrote {(tmp_path / 'out' / 'm.onnx').resolve()} (one file" in out and 'torchscript exporter' in out
    assert 'at 1x3x64x64, 3x3x96x128' in out and 'opset 18, ai.onnx ops only: ' in out
    with pytest.raises(SystemExit):
        export_onnx.main(['mpvit_tiny', str(tmp_path / 'x.onnx'), '--size', '100'])


def test_size_takes_height_and_width():
    assert export_onnx.parse_size(['512', '1024']) == export_onnx.parse_size(['512x1024']) == (512, 1024)
    assert export_onnx.parse_size(['224']) == (224, 224)
    args = export_onnx.parse_args(['mpvit_tiny', 'm.onnx', '--size', '96x128', '--features-only', '--stem-levels'])
    assert args.size == (96, 128) and args.stem_levels
    for bad in (['96', '100'], ['96x'], ['1x2x3'], ['0']):
        with pytest.raises(export_onnx.InvalidInputError, match='--size'):
            export_onnx.parse_size(bad)
