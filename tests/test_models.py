"""The core model: exact layout and figures of the reference, fidelity, and timm behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from fidelity import compare, golden, synth_input, synth_state_dict
from fvcore.nn import FlopCountAnalysis
from helpers import load_script

import mpvit
from mpvit import CheckpointError

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ['tiny', 'xsmall', 'small', 'base']
CHANNELS = {
    'tiny': [96, 176, 216, 216], 'xsmall': [128, 192, 256, 256],
    'small': [128, 216, 288, 288], 'base': [224, 368, 480, 480],
}


def _tool(name: str):
    """A developers' script (dev/) imported as a module."""
    return load_script(f'dev/{name}.py')


def _write(path, checkpoint) -> str:
    torch.save(checkpoint, path)
    return str(path)


def _from_file(variant: str, path: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(
        f'mpvit_{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


@pytest.fixture(scope='module')
def synthetic_small(tmp_path_factory):
    """MPViT-S synthetic weights (the fidelity recipe), written as a released classification checkpoint."""
    weights = synth_state_dict(golden('manifest_mpvit_small.json')['tensors'])
    path = _write(tmp_path_factory.mktemp('ckpt') / 'mpvit_small.pth', {'model': weights})
    return weights, path


@pytest.mark.parametrize('variant', VARIANTS)
def test_layout_params_and_flops_match_reference(variant):
    manifest = golden(f'manifest_mpvit_{variant}.json')
    model = timm.create_model(f'mpvit_{variant}', fast_ops=False).eval()  # FLOPs are counted on textbook ops
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest['tensors']
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest['params_trainable']
    assert _fvcore_flops(model) == manifest['fvcore_flops_224']
    # The fast ops trace to more multiply-adds (zero taps, off-diagonal head blocks): never counted by default.
    assert _fvcore_flops(model.set_fast_ops(True)) > manifest['fvcore_flops_224']


def _fvcore_flops(model: torch.nn.Module) -> int:
    flops = FlopCountAnalysis(model, torch.zeros(1, 3, 224, 224))
    flops.unsupported_ops_warnings(False)
    flops.uncalled_modules_warnings(False)
    return flops.total()


@pytest.mark.parametrize('variant', ['tiny', 'small'])
def test_fidelity_against_reference_outputs(variant, tmp_path):
    ref = golden(f'cls_mpvit_{variant}_224x224.json')
    weights = synth_state_dict(golden(f'manifest_mpvit_{variant}.json')['tensors'])
    path = _write(tmp_path / 'ckpt.pth', {'model': weights})
    x = synth_input(**ref['input'])

    model = _from_file(variant, path).eval()
    with torch.no_grad():
        logits = model(x)
    assert compare(ref['logits'], logits) == []

    features = _from_file(variant, path, features_only=True).eval()
    with torch.no_grad():
        stages = features(x)
    for i, (summary, out) in enumerate(zip(ref['stages'], stages)):
        assert compare(summary, out) == [], f'stage {i}'


def test_fidelity_check_notices_a_changed_weight(synthetic_small, tmp_path):
    """The comparison is sharp enough to catch one aliased CRPE kernel being off."""
    weights, _ = synthetic_small
    ref = golden('cls_mpvit_small_224x224.json')
    changed = dict(weights)
    key = 'mhca_stages.2.mhca_blks.1.MHCA_layers.5.factoratt_crpe.crpe.conv_list.2.weight'
    changed[key] = changed[key] * 1.01
    model = _from_file('small', _write(tmp_path / 'changed.pth', {'model': changed})).eval()
    with torch.no_grad():
        assert compare(ref['logits'], model(synth_input(**ref['input']))) != []


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,  # bare state dict
    lambda sd: {'model': sd, 'epoch': 299},  # DeiT-style training checkpoint
    lambda sd: {'model': {f'backbone.bottom_up.backbone.{k}': v for k, v in sd.items() if 'cls_head' not in k}
                | {'backbone.fpn_lateral3.weight': torch.zeros(256, 216, 1, 1), 'head.cls_score.bias': torch.zeros(9)}},
    lambda sd: {'state_dict': {f'backbone.{k}': v for k, v in sd.items() if 'cls_head' not in k}
                | {'decode_head.conv_seg.weight': torch.zeros(150, 512, 1, 1)}, 'meta': {'iter': 160000}},
    lambda sd: {'model': {f'backbone.0.backbone.{k}': v for k, v in sd.items() if 'cls_head' not in k}
                | {'transformer.level_embed': torch.zeros(4, 256)}},
], ids=['bare', 'classification', 'detectron2', 'mmseg', 'deformable_detr'])
def test_loads_every_released_format(wrap, synthetic_small, tmp_path):
    weights, _ = synthetic_small
    expected = timm.create_model('mpvit_small')
    expected.load_state_dict(weights)  # shared CPE/CRPE aliases: the last one loaded wins, as in the reference
    model = _from_file('small', _write(tmp_path / 'ckpt.pth', wrap(weights)))
    reference = expected.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith('cls_head'):
            assert torch.equal(value, reference[key]), key


def test_num_classes_and_headless_load_backbone(synthetic_small):
    weights, path = synthetic_small
    model = _from_file('small', path, num_classes=10)
    assert model.get_classifier().out_features == 10
    headless = _from_file('small', path, num_classes=0)
    assert isinstance(headless.get_classifier(), torch.nn.Identity)
    assert torch.equal(headless.state_dict()['stem.0.conv.weight'], weights['stem.0.conv.weight'])


def test_checkpoint_of_another_variant_is_refused_with_key_summary(tmp_path):
    tiny = synth_state_dict(golden('manifest_mpvit_tiny.json')['tensors'])
    path = _write(tmp_path / 'tiny.pth', {'model': tiny})
    with pytest.raises(CheckpointError, match=r'does not fit mpvit_small.*missing keys.*wrong shape') as err:
        _from_file('small', path)
    assert len(str(err.value)) < 2000  # a summary, not torch's wall of keys


def test_unrelated_and_corrupt_files_are_refused(tmp_path):
    path = _write(tmp_path / 'resnet.pth', {'model': {'conv1.weight': torch.zeros(64, 3, 7, 7)}})
    with pytest.raises(CheckpointError, match='no MPViT weights'):
        _from_file('tiny', path)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'this is not a checkpoint' * 10)
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        _from_file('tiny', str(corrupt))
    truncated = tmp_path / 'truncated.pth'
    good = _write(tmp_path / 'good.pth', {'model': timm.create_model('mpvit_tiny').state_dict()})
    truncated.write_bytes(open(good, 'rb').read()[:5000])
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        _from_file('tiny', str(truncated))
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        _from_file('tiny', str(tmp_path / 'missing.pth'))


@pytest.mark.parametrize('variant', VARIANTS)
def test_forward_backward_and_features(variant):
    torch.manual_seed(0)
    model = timm.create_model(f'mpvit_{variant}', num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 96, 128)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []

    features = timm.create_model(f'mpvit_{variant}', features_only=True).eval()
    assert features.feature_info.channels() == CHANNELS[variant]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    maps = features(torch.randn(1, 3, 128, 160))
    assert [tuple(m.shape) for m in maps] == [
        (1, c, 128 // s, 160 // s) for c, s in zip(CHANNELS[variant], [4, 8, 16, 32])]


def test_out_indices_prune_later_stages():
    model = timm.create_model('mpvit_tiny', features_only=True, out_indices=(1, 2))
    assert model.feature_info.channels() == [176, 216]
    assert len(model.model.mhca_stages) == 3
    maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 176, 8, 8), (1, 216, 4, 4)]


def test_odd_input_sizes():
    model = timm.create_model('mpvit_tiny', features_only=True).eval()
    maps = model(torch.randn(1, 3, 97, 141))
    # Every stride-2 conv pads by one: ceil-halving at each step.
    assert [tuple(m.shape[-2:]) for m in maps] == [(25, 36), (13, 18), (7, 9), (4, 5)]


def test_head_api():
    model = timm.create_model('mpvit_tiny').eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 216, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 216)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 216)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 216, 2, 2)
    assert model.pretrained_cfg['first_conv'] == 'stem.0.conv'
    assert model.pretrained_cfg['classifier'] == 'cls_head.cls'
    assert model.pretrained_cfg['crop_pct'] == 0.875 and model.pretrained_cfg['interpolation'] == 'bicubic'
    assert model.get_submodule('stem.0.conv').in_channels == 3


@pytest.mark.parametrize('pool', ['avg', 'max', 'avgmax'])
def test_global_pool_choices(pool):
    model = timm.create_model('mpvit_tiny', num_classes=3, global_pool=pool).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    pooled = {'avg': feats.mean((2, 3)), 'max': feats.amax((2, 3))}
    pooled['avgmax'] = (pooled['avg'] + pooled['max']) / 2
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled[pool])
    assert model(x).shape == (2, 3)
    assert model.get_classifier().in_features == pooled[pool].shape[1]


def test_global_pool_none_keeps_the_classifier_at_every_position():
    """global_pool='' with classes: the released head's weights applied per position, as timm's conv heads."""
    pooled = timm.create_model('mpvit_tiny', num_classes=3).eval()
    model = timm.create_model('mpvit_tiny', num_classes=3, global_pool='').eval()
    missing, unexpected = model.load_state_dict(pooled.state_dict())
    assert not missing and not unexpected
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape == (2, 3, 2, 3)
        torch.testing.assert_close(logits.mean((2, 3)), pooled(x))  # a linear head commutes with the mean
    model.reset_classifier(0)
    assert model(x).shape == (2, 216, 2, 3)  # the pool is kept by reset_classifier(n)
    model.reset_classifier(4, 'avg')
    assert model(x).shape == (2, 4)
    for unsupported in ('token', 'catavgmax'):  # catavgmax would double the pre-logits width
        with pytest.raises(ValueError, match=f"global_pool must be one of .*{unsupported!r}"):
            timm.create_model('mpvit_tiny', global_pool=unsupported)


def test_factory_kwargs_and_reset_classifier_keep_device_dtype_and_mode():
    model = timm.create_model('mpvit_tiny', device='meta', dtype=torch.float64).eval()
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {'meta'} and model.stem[0].conv.weight.dtype == torch.float64
    assert model.forward_features(torch.empty(1, 3, 64, 64, device='meta', dtype=torch.float64)).shape == (1, 216, 2, 2)
    model.reset_classifier(7)
    weight = model.get_classifier().weight
    assert (weight.device.type, weight.dtype, model.cls_head.training) == ('meta', torch.float64, False)
    with pytest.raises(TypeError):
        timm.create_model('mpvit_tiny', not_an_argument=1)


@pytest.mark.parametrize('fast_ops,batch_paths', [(True, 'always'), (True, 'never'), (False, 'auto')])
def test_torchscript_matches_eager(fast_ops, batch_paths):
    model = mpvit.set_batch_paths(timm.create_model('mpvit_tiny', fast_ops=fast_ops), batch_paths).eval()
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))
        model.fuse()
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
    kinds = {node.kind() for node in scripted.inlined_graph.nodes()}
    assert ('aten::baddbmm' in kinds) == fast_ops and ('aten::einsum' in kinds) != fast_ops


@pytest.mark.parametrize('batch_paths', ['always', 'never'])
def test_grad_checkpointing_gives_same_gradients(batch_paths):
    torch.manual_seed(0)
    model = mpvit.set_batch_paths(timm.create_model('mpvit_tiny'), batch_paths)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)


def test_drop_path_schedule_is_linear_over_all_layers():
    model = timm.create_model('mpvit_small', drop_path_rate=0.3)
    rates = [stage.mhca_blks[0].MHCA_layers[i].drop_path for stage in model.mhca_stages
             for i in range(len(stage.mhca_blks[0].MHCA_layers))]
    probs = [getattr(d, 'drop_prob', 0.0) for d in rates]
    torch.testing.assert_close(torch.tensor(probs), torch.linspace(0, 0.3, 13))


def test_save_load_round_trip_and_trace(tmp_path):
    model = timm.create_model('mpvit_tiny').eval()
    x = torch.randn(1, 3, 64, 64)
    path = _write(tmp_path / 'model.pth', model.state_dict())
    reloaded = _from_file('tiny', path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))


def test_norm_layer_is_an_argument():
    model = mpvit.MPViT(**mpvit.MPVIT_ARCHS['tiny'], norm_layer=lambda c: torch.nn.GroupNorm(1, c))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    default = timm.create_model('mpvit_tiny')
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in default.modules())


def test_benchmark_tool_smoke(tmp_path):
    """CPU smoke run of dev/benchmark.py (the real figures need a GPU; see the README)."""
    bench = _tool('benchmark')
    out = tmp_path / 'bench.json'
    rows = bench.main(['--models', 'mpvit_tiny', '--batch-size', '2', '--img-size', '64', '96', '--amp', 'none',
                       '--warmup', '1', '--iters', '1', '--device', 'cpu', '--json', str(out)])
    assert [r['mode'] for r in rows] == ['infer', 'train'] and all(r['images_per_s'] > 0 for r in rows)
    # fp32: a bf16 training step takes minutes on CPUs without bf16 kernels (bf16 numerics: test_fast_paths.py).
    features = bench.main(['--models', 'mpvit_tiny', '--features', '--mode', 'train', '--batch-size', '1',
                           '--img-size', '64', '--amp', 'none', '--channels-last', '--warmup', '0', '--iters', '1',
                           '--device', 'cpu', '--profile', '3'])
    assert features[0]['features'] and json.loads(out.read_text())[0]['img_size'] == [64, 96]
    top = features[0]['profile']
    assert len(top) == 3 and top[0]['share'] >= top[2]['share'] > 0 and sum(p['share'] for p in top) <= 1
    side_by_side = bench.main(['--models', 'mpvit_tiny', '--impl', 'both', '--fuse', '--mode', 'infer',
                               '--batch-size', '1', '--img-size', '64', '--amp', 'none', '--warmup', '0',
                               '--iters', '1', '--device', 'cpu'])
    assert [r['impl'] for r in side_by_side] == ['textbook', 'fast'] and side_by_side[1]['fused']
    assert side_by_side[1]['vs_textbook'] > 0 and 'vs_reference' not in side_by_side[1]


def test_benchmark_ratios_to_the_reference_table():
    """Rows measured on an H100 at the reference's settings are divided by its figures and judged on the targets."""
    bench = _tool('benchmark')
    common = dict(model='mpvit_small', impl='fast', batch_size=128, img_size=[224, 224], fused=False, features=False,
                  device='NVIDIA H100 80GB HBM3')
    rows = [
        dict(common, mode='infer', amp='bf16', channels_last=False, compile=False, images_per_s=4800.,
             peak_memory_gib=3.),
        dict(common, mode='infer', amp='bf16', channels_last=True, compile=True, images_per_s=6000.,
             peak_memory_gib=3.),
        dict(common, mode='train', amp='bf16', channels_last=False, compile=False, images_per_s=1100.,
             peak_memory_gib=17.),
        dict(common, mode='train', amp='bf16', channels_last=False, compile=False, images_per_s=1100.,
             peak_memory_gib=17., batch_size=64),
    ]
    bench.add_ratios(rows)
    assert rows[0]['reference_column'] == 'bf16' and rows[0]['meets_target']
    assert abs(rows[0]['vs_reference'] - 4800 / 1885) < 1e-9
    assert rows[1]['reference_column'] == 'bf16_cl_compile' and not rows[1]['meets_target']
    assert rows[2]['vs_reference'] > 2 and not rows[2]['meets_target']  # faster, but more memory than 16.3 GiB
    assert 'vs_reference' not in rows[3]
    assert 'NOT met' in bench.render(rows)


def test_benchmark_times_a_reference_file_in_the_same_run(tmp_path):
    """--reference-file: the authors' file registers mpvit_* with timm; ours stay registered, its are timed."""
    bench = _tool('benchmark')
    stand_in = tmp_path / 'reference_mpvit.py'
    stand_in.write_text(
        'import timm\nfrom timm.models.registry import register_model\n\n\n@register_model\n'
        'def mpvit_tiny(**kwargs):\n    return timm.create_model("resnet10t", num_classes=1000)\n')
    rows = bench.main(['--models', 'mpvit_tiny', '--reference-file', str(stand_in), '--mode', 'infer',
                       '--batch-size', '1', '--img-size', '64', '--amp', 'none', '--warmup', '0', '--iters', '1',
                       '--device', 'cpu'])
    assert type(timm.create_model('mpvit_tiny')).__name__ == 'MPViT'
    assert [r['impl'] for r in rows] == ['fast', 'reference']
    assert rows[0]['reference_source'] == 'same run' and rows[0]['vs_reference'] > 0
    with pytest.raises(SystemExit, match='no such file'):
        bench.load_reference(str(tmp_path / 'missing.py'))

    per_path = {k: v for k, v in rows[0].items() if k not in ('vs_reference', 'reference_source')}
    per_path.update(impl='per-path', images_per_s=1.234 * rows[1]['images_per_s'])
    bench.add_ratios([per_path, rows[1]])  # the CPU's default form: divided by the reference, not judged
    assert abs(per_path['vs_reference'] - 1.234) < 1e-9 and per_path['reference_source'] == 'same run'
    assert 'target' not in per_path
    assert '| 2.47 |' in bench.render([dict(per_path, images_per_s=2.4681)])

    measured = [dict(r, batch_size=128, img_size=[224, 224], mode='train', amp='bf16', peak_memory_gib=10.)
                for r in rows]
    measured[0]['images_per_s'] = 2.5 * measured[1]['images_per_s']
    bench.add_ratios(measured)
    assert measured[0]['reference_column'] == 'train' and measured[0]['meets_target']


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """No graph breaks (fullgraph) and the same numbers; takes about a minute on 2 CPU cores with MPViT-T's
    stages at five layers (one stage stacks two; compiling costs per layer)."""
    model = timm.create_model('mpvit_tiny', num_layers=(1, 2, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_export_matches_eager():
    """The model exports as one graph (torch.export, the successor of TorchScript) with the same numbers."""
    model = timm.create_model('mpvit_tiny').eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_features_only_model_fuses_and_checkpoints():
    """features_only=True gives MPViTFeatures: .fuse() as on the classifier (and the same as timm's
    reparameterize_model), set_grad_checkpointing, timm's feature_info, the model's keys under model."""
    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model('mpvit_tiny', features_only=True, out_indices=(1, 3))
    info = timm.create_model('mpvit_tiny').feature_info
    assert model.feature_info.channels() == [info[1]['num_chs'], info[3]['num_chs']]
    assert model.feature_info.reduction() == [8, 32]
    assert next(iter(model.state_dict())).startswith('model.stem.')
    for module in model.modules():  # non-trivial statistics, so that folding them changes the weights
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        by_timm = reparameterize_model(model)(x)
        fused = model.fuse()
        got = fused(x)
    assert fused is model and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b, c in zip(got, by_timm, expected):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)

    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('mpvit_tiny', features_only=True).train()
        model.set_grad_checkpointing(enable)
        sum(f.pow(2).mean() for f in model(x)).backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0)


@pytest.mark.parametrize('feature_cls', ['hook', 'fx'])
def test_other_feature_wrappers_match_the_getter(feature_cls):
    """timm's feature_cls='hook' and 'fx' (torchvision's create_feature_extractor, a symbolic trace)."""
    plain = timm.create_model('mpvit_tiny').eval()
    wrapped = timm.create_model('mpvit_tiny', features_only=True, feature_cls=feature_cls, out_indices=(1, 3)).eval()
    prefix = {'hook': 'body.', 'fx': 'graph_module.'}[feature_cls]
    missing, _ = wrapped.load_state_dict({prefix + k: v for k, v in plain.state_dict().items()}, strict=False)
    assert not missing
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = plain.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        got = wrapped(x)
    assert len(got) == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_dict_feature_wrapper_is_refused_clearly():
    with pytest.raises(ValueError, match="feature_cls='dict' .* use the default"):
        timm.create_model('mpvit_tiny', features_only=True, feature_cls='dict')


def test_count_ops_counts_bytes_written_in_place():
    """The op counter counts what an op writes into its arguments, also for ops that return nothing (the in-place
    foreach ops), once per tensor written."""
    counter = _tool('count_ops').OpCounter()
    a, b = torch.zeros(10), torch.ones(10)
    with counter:
        a.add_(b)
        torch.add(a, b, out=a)
        torch._foreach_copy_([a[:4], a[4:]], [b[:4], b[4:]])
    assert counter.kernels == 3
    assert dict(counter.bytes_by_op) == {'add_': 40, 'add': 40, '_foreach_copy_': 40}


def test_count_ops_counts_the_batched_and_per_path_forms():
    """dev/count_ops.py on a tiny input: the batched form launches fewer ops than path by path, writes its
    rows as JSON, and measures the weight stacking on the inference row of the batched form."""
    count_ops = _tool('count_ops')
    rows = count_ops.main(['--models', 'mpvit_tiny', '--impl', 'paths', '--img-size', '32', '--batch-size', '2',
                           '--amp', 'bf16'])
    by = {(r['impl'], r['mode']): r for r in rows}
    assert set(by) == {(impl, mode) for impl in ('per-path', 'batched') for mode in ('train', 'infer')}
    for mode in ('train', 'infer'):
        assert 0 < by['batched', mode]['ops'] < 0.5 * by['per-path', mode]['ops']
    assert by['batched', 'train']['saved_mib'] > 0 and by['batched', 'infer']['saved_mib'] is None
    assert by['batched', 'infer']['weight_prep_ops'] > 0 and 'weight_prep_ops' not in by['batched', 'train']


def test_timm_files_the_family_under_its_name():
    """timm names a family by the module that registers it: the entrypoints live in a module named mpvit."""
    assert timm.list_models(module='mpvit') == ['mpvit_base', 'mpvit_small', 'mpvit_tiny', 'mpvit_xsmall']
    assert timm.models.get_pretrained_cfg('mpvit_small').first_conv == 'stem.0.conv'
