"""The optimised ops against the textbook ones they replace (float32), eager and compiled."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import timm
import torch
import torch.nn as nn
from fidelity import compare, golden, synth_input, synth_state_dict
from helpers import load_script
from torch.utils._python_dispatch import TorchDispatchMode

import mpvit
from mpvit.models.batched_paths import BatchedMHCAStage, _stack_params_once, paths_batchable
from mpvit.models.mpvit import (
    ConvRelPosEnc,
    FactorAttnConvRelPosEnc,
    LayerNorm,
    MHCAEncoder,
    MHCAStage,
    _softmax,
    fold_batchnorm,
)


@contextmanager
def textbook_ops(model: nn.Module) -> Iterator[None]:
    mpvit.set_fast_ops(model, False)
    try:
        yield
    finally:
        mpvit.set_fast_ops(model, True)


def _model(variant: str, **kwargs) -> nn.Module:
    """A model whose norms hold non-trivial statistics, so that folding them is really tested; its stages batch
    their paths (what a GPU runs) on the CPU too."""
    torch.manual_seed(0)
    model = mpvit.set_batch_paths(timm.create_model(f'mpvit_{variant}', **kwargs), 'always')
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1, 0.1)
                module.bias.normal_(0, 0.05)
    return model


def _batched_stage(*args, **kwargs) -> MHCAStage:
    """An MHCAStage with the batched execution installed."""
    stage = mpvit.set_batch_paths(MHCAStage(*args, **kwargs), 'always')
    assert type(stage) is BatchedMHCAStage
    return stage


def _assert_close(fast: torch.Tensor, slow: torch.Tensor) -> None:
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4 * slow.std().item())


@pytest.mark.parametrize('variant', ['tiny', 'xsmall', 'small', 'base'])
def test_inference_equals_textbook_ops(variant):
    model = _model(variant).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fast = model.forward_intermediates(x)
        with textbook_ops(model):
            slow = model.forward_intermediates(x)
    _assert_close(fast[0], slow[0])
    for f, s in zip(fast[1], slow[1]):
        _assert_close(f, s)


def test_training_gradients_equal_textbook_ops():
    model = _model('tiny', drop_path_rate=0.).train()
    x = torch.randn(2, 3, 64, 96)

    def grads(textbook: bool):
        model.zero_grad()
        mpvit.set_fast_ops(model, not textbook)
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_fast, fast = grads(False)
    loss_slow, slow = grads(True)
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-5, atol=0)
    assert fast.keys() == slow.keys()
    # Some gradients are zero up to rounding (biases right before a batch norm in training mode).
    floor = 1e-3 * max(g.abs().max().item() for g in slow.values())
    for name in fast:
        scale = max(slow[name].abs().max().item(), floor)
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m, n=name: f'{n}: {m}')


def test_attention_module_equals_per_head_einsums():
    """The block-diagonal attention on its own, with unequal CRPE windows and random weights."""
    torch.manual_seed(1)
    crpe = ConvRelPosEnc(head_dim=6, num_heads=8, window={3: 2, 5: 3, 7: 3})
    attn = FactorAttnConvRelPosEnc(48, 8, crpe)
    x = torch.randn(3, 7, 9, 48)
    _assert_close(attn(x), attn.forward_per_head(x))


def test_merged_crpe_kernel_equals_split_convs():
    torch.manual_seed(2)
    crpe = ConvRelPosEnc(head_dim=4, num_heads=8, window={3: 2, 5: 3, 7: 3})
    v = torch.randn(2, 11, 13, 32)
    fast = crpe.conv_v(v)
    with textbook_ops(crpe):
        slow = crpe.conv_v(v)
    _assert_close(fast, slow)


@pytest.mark.parametrize('variant', ['tiny', 'small'])
def test_fused_and_textbook_models_match_golden(variant, tmp_path):
    """Both formulations, and the batch-norm-folded model, reproduce the reference's outputs."""
    ref = golden(f'cls_mpvit_{variant}_224x224.json')
    weights = synth_state_dict(golden(f'manifest_mpvit_{variant}.json')['tensors'])
    model = timm.create_model(f'mpvit_{variant}').eval()
    model.load_state_dict(weights)
    x = synth_input(**ref['input'])
    with torch.no_grad():
        with textbook_ops(model):
            assert compare(ref['logits'], model(x)) == []
        model.fuse()
        assert compare(ref['logits'], model(x)) == []


def test_fuse_folds_every_batch_norm_and_keeps_outputs():
    model = _model('tiny').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert model.fuse() is model
        after = model(x)
    _assert_close(after, before)
    with torch.no_grad(), textbook_ops(model):
        _assert_close(model(x), before)
    assert not [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(len(m.conv_list) == 1 for m in model.modules() if isinstance(m, ConvRelPosEnc))
    assert not [k for k in model.state_dict() if 'running_mean' in k]
    assert 'stem.0.conv.bias' in model.state_dict()


def test_timm_reparameterize_model_fuses_the_same_way():
    """timm's validate.py / benchmark.py --reparam path: a fused copy with the same outputs."""
    from timm.utils import reparameterize_model

    model = _model('tiny').eval()
    x = torch.randn(2, 3, 64, 64)
    fused = reparameterize_model(model)
    assert fused is not model and [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(len(m.conv_list) == 1 for m in fused.modules() if isinstance(m, ConvRelPosEnc))
    with torch.no_grad():
        _assert_close(fused(x), model(x))
    assert fused.state_dict().keys() == model.eval().fuse().state_dict().keys()


def test_fuse_refuses_training_mode_and_leaves_group_norm():
    with pytest.raises(RuntimeError, match='eval'):
        _model('tiny').train().fuse()
    model = _model('tiny', norm_layer=lambda c: nn.GroupNorm(8, c)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.fuse()
        after = model(x)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) > 0
    torch.testing.assert_close(after, before)
    assert fold_batchnorm(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4)) is None


def _traced_ops(model: nn.Module) -> set:
    graph = torch.jit.trace(model, torch.zeros(1, 3, 64, 64), check_trace=False).inlined_graph
    return {node.kind() for node in graph.nodes()}


def test_tracing_runs_the_ops_the_flags_choose():
    """A jit trace (what fvcore counts) records the fast ops unless the textbook ones are asked for."""
    assert 'aten::baddbmm' in _traced_ops(timm.create_model('mpvit_tiny').eval())
    textbook = _traced_ops(timm.create_model('mpvit_tiny', fast_ops=False).eval())
    assert 'aten::einsum' in textbook and 'aten::baddbmm' not in textbook
    switched = _traced_ops(timm.create_model('mpvit_tiny').eval().set_fast_ops(False))
    assert switched == textbook


def test_eager_default_takes_the_fast_paths(monkeypatch):
    """By default no split CRPE conv and no per-head einsum runs; with textbook ops both do."""
    model = timm.create_model('mpvit_tiny').eval()
    calls = {'split_conv': 0, 'per_head': 0}

    def count_split_conv(*_):
        calls['split_conv'] += 1

    for crpe in (m for m in model.modules() if isinstance(m, ConvRelPosEnc)):
        assert len(crpe.conv_list) == 3
        for conv in crpe.conv_list:
            conv.register_forward_pre_hook(count_split_conv)
    per_head = FactorAttnConvRelPosEnc.forward_per_head

    def count_per_head(self, x):
        calls['per_head'] += 1
        return per_head(self, x)

    monkeypatch.setattr(FactorAttnConvRelPosEnc, 'forward_per_head', count_per_head)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        model(x)
        assert calls == {'split_conv': 0, 'per_head': 0}
        with textbook_ops(model):
            model(x)
    layers = sum(len(m.MHCA_layers) for m in model.modules() if isinstance(m, MHCAEncoder))
    assert calls['per_head'] == layers and calls['split_conv'] == 3 * layers


def test_bf16_autocast_is_as_accurate_as_textbook_ops():
    model = _model('tiny').eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        exact = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            fast = model(x).float()
            with textbook_ops(model):
                slow = model(x).float()

    def error(out: torch.Tensor) -> float:
        return ((out - exact).abs().mean() / exact.abs().mean()).item()

    assert error(fast) < 0.02 and error(fast) <= 1.2 * error(slow)


def test_layer_norm_and_softmax_keep_the_autocast_dtype():
    """On float32 input under autocast, the native ops return float32; ours return the autocast dtype."""
    norm = LayerNorm(16, eps=1e-6)
    x = torch.randn(4, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x)
        assert nn.LayerNorm(16)(x).dtype == torch.float32 and x.softmax(0).dtype == torch.float32
        probs = _softmax(x, dim=0)
    assert out.dtype == probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), x.softmax(0), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), nn.functional.layer_norm(x, (16,), eps=1e-6), rtol=2e-2, atol=2e-2)


class _Float32Outputs(TorchDispatchMode):
    """Shapes of the float32 tensors that ops write (views write nothing) whose first dimension is one of
    ``batch_dims``."""

    def __init__(self, batch_dims) -> None:
        super().__init__()
        self.batch_dims, self.shapes = batch_dims, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in [] if func.is_view else torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 3:
                if t.shape[0] in self.batch_dims:
                    self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize('batched', [False, True])
def test_attention_context_stays_in_the_autocast_dtype(batched):
    """The head mask is exact in bf16 and the scale goes to the product's alpha: masking the [C, C] context
    writes no float32 copy of it (nor casts it back)."""
    torch.manual_seed(0)
    stage = mpvit.set_batch_paths(MHCAStage(32, 32, 1, num_heads=8, mlp_ratio=2., num_path=3, drop_path_list=[0.]),
                                  'always' if batched else 'never').eval()
    inputs = [torch.randn(2, 32, 5, 5) for _ in range(3)]
    attention = stage.mhca_blks[0].MHCA_layers[0].factoratt_crpe
    tokens = inputs[0].permute(0, 2, 3, 1)
    recorder = _Float32Outputs((2, 6))
    with torch.no_grad():
        exact = stage(inputs) if batched else attention.forward_per_head(tokens)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            with recorder:
                if batched:
                    out = stage.forward_paths([x.to(torch.bfloat16) for x in inputs])
                else:
                    out = attention(tokens.to(torch.bfloat16))
            approx = stage(inputs) if batched else out
    torch.testing.assert_close(approx.float(), exact, rtol=0.05, atol=0.05)
    assert out.dtype == torch.bfloat16 and recorder.shapes == []


class _ActivationWrites(TorchDispatchMode):
    """Counts the ops of kind ``op`` that write ``numel``-sized tensors (a stage's activations, bigger than any
    weight here)."""

    def __init__(self, op: torch._ops.OpOverload, numel: int) -> None:
        super().__init__()
        self.op, self.numel, self.count = op, numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += func is self.op and out.numel() == self.numel
        return out


def _backward_activation_writes(op: torch._ops.OpOverload, num_layers: int, drop_path: float = 0.) -> int:
    torch.manual_seed(0)
    stage = _batched_stage(32, 32, num_layers, num_heads=8, mlp_ratio=2., num_path=3,
                      drop_path_list=[drop_path] * num_layers).train()
    inputs = [torch.randn(4, 32, 8, 8).to(memory_format=torch.channels_last).requires_grad_() for _ in range(3)]
    out = stage(inputs).sum()
    counter = _ActivationWrites(op, 3 * 4 * 32 * 8 * 8)
    with counter:
        out.backward()
    return counter.count


def _per_layer(op: torch._ops.OpOverload, drop_path: float = 0.) -> int:
    return _backward_activation_writes(op, 2, drop_path) - _backward_activation_writes(op, 1, drop_path)


def test_batched_stochastic_depth_copies_no_gradient():
    """Batched, stochastic depth applies its [P * B] mask on [P, B, ...] as is: a layer's backward copies no more
    activation-sized gradients with it than without (merging P and B copied the residual's gradient twice)."""
    clones = torch.ops.aten.clone.default
    assert _per_layer(clones, drop_path=0.2) == _per_layer(clones)


def test_batched_qkv_gradient_accumulates_in_place():
    """Batched, the gradient of the normed tokens is one product and two in-place accumulations over q, k and v:
    a layer's backward adds activation-sized tensors only where a tensor has two consumers (the residual twice,
    q and v: attention and CRPE), not for the three products' gradients (two adds more)."""
    assert _per_layer(torch.ops.aten.add.Tensor) == 4
    assert _per_layer(torch.ops.aten.baddbmm_.default) == 2


def test_batched_crpe_gradient_is_written_in_the_conv_layout():
    """Batched, the CRPE product writes its conv operand's gradient in the conv's channel layout: a layer's
    backward copies only the two norms' gradients into the norms' layout (it copied the CRPE conv's as well)."""
    assert _per_layer(torch.ops.aten.clone.default) == 2


class _WeightShapedClones(TorchDispatchMode):
    """The shapes of the copies (``clone``) written in the shape of one of ``shapes``."""

    def __init__(self, shapes: set) -> None:
        super().__init__()
        self.shapes, self.found = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.clone.default and tuple(out.shape) in self.shapes:
            self.found.append(tuple(out.shape))
        return out


def test_batched_linear_weight_gradients_come_in_their_own_layout():
    """Batched, the products' weight gradients are written ``[P, out, in]``, the stacked weights' layout: none is
    copied on its way back to the parameters (autograd's product backward wrote ``[P, in, out]``)."""
    torch.manual_seed(0)
    stage = _batched_stage(32, 32, 1, num_heads=8, mlp_ratio=2., num_path=3, drop_path_list=[0.]).train()
    inputs = [torch.randn(4, 32, 8, 8).to(memory_format=torch.channels_last) for _ in range(3)]
    layer = stage.mhca_blks[0].MHCA_layers[0]
    weights = [layer.factoratt_crpe.qkv.weight, layer.factoratt_crpe.proj.weight, layer.mlp.fc1.weight,
               layer.mlp.fc2.weight]
    shapes = {(3,) + tuple(w.shape) for w in weights} | {(3,) + tuple(w.shape[::-1]) for w in weights}
    shapes |= {(3, 32, 32)}  # q's, k's and v's thirds of qkv
    out = stage(inputs).sum()
    recorder = _WeightShapedClones(shapes)
    with recorder:
        out.backward()
    assert recorder.found == []
    assert all(w.grad is not None for encoder in stage.mhca_blks for w in encoder.parameters())


def _stacking_bytes() -> tuple:
    """Bytes one stage's parameter stacking writes under bf16 autocast (forward; backward from given gradients),
    the number of elements stacked, and how many of those are conv kernels (their preparation writes extra)."""
    torch.manual_seed(0)
    stage = _batched_stage(32, 32, 2, num_heads=8, mlp_ratio=2., num_path=3, drop_path_list=[0.] * 2).train()
    op_counter = load_script('dev/count_ops.py').OpCounter
    counter = op_counter()
    with torch.autocast('cpu', dtype=torch.bfloat16), counter:
        layer_params, *kernels = stage._stage_weights(torch.bfloat16)
    stacked = [t for params in layer_params for t in params] + kernels
    assert all(t.dtype == torch.bfloat16 for t in stacked)
    forward = counter.bytes_written
    grads = [torch.randn_like(t) for t in stacked]
    params = list(stage.mhca_blks.parameters())
    counter = op_counter()
    with counter:
        param_grads = torch.autograd.grad(stacked, params, grads)
    assert all(g.dtype == torch.float32 for g in param_grads)
    return forward, counter.bytes_written, sum(t.numel() for t in stacked), sum(t.numel() for t in kernels)


def test_stacked_weights_are_written_once_each_way():
    """Under autocast the stacked parameters are written once, in bf16 (not a float32 concatenation, then its
    cast), and their gradients once, in float32 (not a bf16 concatenation, then its cast). The CPE / CRPE
    kernels' preparation (identity tap, padding to the merged kernel) writes a little more, in float32."""
    forward, backward, numel, kernel_numel = _stacking_bytes()
    assert 2 * numel <= forward <= 2 * numel + 8 * kernel_numel
    assert 4 * numel <= backward <= 4 * numel + 4 * kernel_numel


def test_batched_training_composes_with_torch_func_and_double_backward():
    """The batched form's autograd functions build differentiable backwards when asked (``torch.func.grad``,
    ``create_graph=True``) and run under ``torch.func.vmap`` (per-sample gradients): the same gradients as the
    paths one by one."""
    torch.manual_seed(0)
    stages = {mode: mpvit.set_batch_paths(MHCAStage(32, 32, 1, num_heads=8, mlp_ratio=2., num_path=3,
                                                    drop_path_list=[0.]), mode) for mode in ('always', 'never')}
    stages['never'].load_state_dict(stages['always'].state_dict())
    inputs = [torch.randn(2, 32, 5, 5) for _ in range(3)]
    results = {}
    for mode, stage in stages.items():
        stage.train()
        stage.InvRes.eval()  # the batch norms in eval: no buffer updates (torch.func)
        stage.aggregate.eval()
        params = {k: v.detach() for k, v in stage.named_parameters()}
        func_grads = torch.func.grad(
            lambda p: torch.func.functional_call(stage, p, (inputs,)).square().sum())(params)  # noqa: B023
        x = [t.clone().requires_grad_() for t in inputs]
        input_grads = torch.autograd.grad(stage(x).square().sum(), x, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in input_grads), list(stage.parameters()),
                                     allow_unused=True, materialize_grads=True)

        def sample_loss(p, *x):
            return torch.func.functional_call(stage, p, ([t.unsqueeze(0) for t in x],)).square().sum()  # noqa: B023
        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0, 0))(params, *inputs)
        results[mode] = (list(func_grads.values()), list(second), list(per_sample.values()))
    for batched, one_by_one in zip(*results.values()):
        for a, b in zip(batched, one_by_one):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_stacking_parameters_of_mixed_dtypes_promotes_them():
    """Parameters of mixed dtypes are stacked as ``torch.cat`` promotes them, not cast to the first one's."""
    pieces = [torch.randn(4, requires_grad=True), torch.randn(3, dtype=torch.float64, requires_grad=True)]
    out = _stack_params_once(pieces, [2, 5], None)
    assert [t.dtype for t in out] == [torch.float64] * 2
    assert torch.equal(torch.cat(out), torch.cat([pieces[0].double(), pieces[1]]))


def test_batched_stochastic_depth_follows_the_drop_path_modules():
    """The batched form draws through each layer's DropPath in that module's own mode (as the per-path forward
    does), and still batches when a DropPath was swapped for an Identity to turn it off."""
    torch.manual_seed(0)
    stage = _batched_stage(16, 16, 1, num_heads=8, mlp_ratio=2., num_path=2, drop_path_list=[0.5]).eval()
    inputs = [torch.randn(8, 16, 4, 4) for _ in range(2)]
    with torch.no_grad():
        plain = stage(inputs)
        for encoder in stage.mhca_blks:
            encoder.MHCA_layers[0].drop_path.train()  # stochastic depth at inference, on purpose
        assert not torch.equal(stage(inputs), plain)
        for encoder in stage.mhca_blks:
            encoder.MHCA_layers[0].drop_path = nn.Identity()
        stage.train()
        assert paths_batchable(stage) == ''
        batched = stage(inputs)
        torch.testing.assert_close(mpvit.set_batch_paths(stage, 'never')(inputs), batched)


def test_stage_maps_are_channels_last_and_input_layout_does_not_matter():
    model = _model('tiny').eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        maps_cl = model.forward_intermediates(x.to(memory_format=torch.channels_last), intermediates_only=True)
    for a, b in zip(maps, maps_cl):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    """Forward and backward as one graph (fullgraph; inference through Inductor is in test_models). Tracing
    costs about 20 s per layer on 2 CPU cores: MPViT-T's stages with five layers (one stage stacks two)."""
    model = _model('tiny', drop_path_rate=0., num_layers=(1, 2, 1, 1)).train()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    compiled(x).square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize('variant', ['tiny', 'small'])
def test_cuda_bf16_close_to_textbook(variant):
    model = _model(variant).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device='cuda')
    with torch.no_grad():
        with textbook_ops(model):
            slow32 = model(x)
        fast32 = model(x)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            fast16 = model(x).float()
            with textbook_ops(model):
                slow16 = model(x).float()
    _assert_close(fast32, slow32)
    # bf16 both ways: compare each with float32 and require the fast path to be no less accurate (within 20%).
    err_fast = (fast16 - slow32).abs().mean() / slow32.abs().mean()
    err_slow = (slow16 - slow32).abs().mean() / slow32.abs().mean()
    assert err_fast < 0.05 and err_fast <= 1.2 * err_slow + 1e-3


@pytest.mark.gpu
def test_cuda_autocast_layer_norm_is_bf16():
    norm = LayerNorm(64).cuda()
    x = torch.randn(8, 64, device='cuda')
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert norm(x).dtype == torch.bfloat16
        assert nn.LayerNorm(64).cuda()(x).dtype == torch.float32  # what native autocast does


def _stage_kernels(num_path: int, num_layers: int, train: bool, fast: bool = True) -> int:
    """Kernels (non-view aten ops) one MHCAStage dispatches for a forward (and backward when ``train``)."""
    torch.manual_seed(0)
    stage = _batched_stage(32, 48, num_layers, num_heads=8, mlp_ratio=2., num_path=num_path,
                      drop_path_list=[0.] * num_layers, fast_ops=fast).train(train)
    inputs = [torch.randn(2, 32, 6, 6, requires_grad=train) for _ in range(num_path)]
    counter = load_script('dev/count_ops.py').OpCounter()
    with counter, torch.set_grad_enabled(train):
        out = stage(inputs)
        if train:
            out.sum().backward()
    return counter.kernels


@pytest.mark.parametrize('train', [False, True])
def test_paths_of_a_stage_run_as_one_batch(train):
    """A layer dispatches the same kernels whatever the number of paths: each path more costs ops once per stage
    (its weights' share of the merged CRPE kernel), not once per layer."""
    per_layer = {p: _stage_kernels(p, 3, train) - _stage_kernels(p, 1, train) for p in (2, 3)}
    assert per_layer[2] == per_layer[3]
    textbook = {p: _stage_kernels(p, 3, train, fast=False) - _stage_kernels(p, 1, train, fast=False) for p in (2, 3)}
    assert textbook[3] > textbook[2] > per_layer[2]  # path by path, as the encoders alone run


def test_drop_path_draws_per_path_and_sample():
    """Batched, stochastic depth still drops each path of each sample on its own (as one DropPath per path)."""
    torch.manual_seed(0)
    stage = _batched_stage(16, 16, 1, num_heads=8, mlp_ratio=2., num_path=3, drop_path_list=[0.5]).train()
    with torch.no_grad():  # the same weights in every path
        for encoder in stage.mhca_blks[1:]:
            for mine, first in zip(encoder.parameters(), stage.mhca_blks[0].parameters()):
                mine.copy_(first)
    x = torch.randn(1, 16, 4, 4).expand(64, -1, -1, -1)
    with torch.no_grad():
        paths = stage.forward_paths([x, x, x]).unflatten(1, (3, 16))  # [B, P, C, H, W]
    differs_from_path_0 = [[not torch.equal(paths[b, p], paths[b, 0]) for p in range(3)] for b in range(64)]
    differs_across_paths = sum(any(row) for row in differs_from_path_0)
    samples = {tuple(paths[b, 0].flatten()[:4].tolist()) for b in range(64)}
    assert differs_across_paths > 32 and len(samples) > 1


def test_wrapped_or_hooked_path_modules_keep_the_stage_per_path():
    """The batched form reads the paths' parameters: a module it cannot stand for (a LoRA-style wrapper, a
    forward hook) must still take effect, so installing it leaves such a stage per-path, with a warning."""
    torch.manual_seed(0)
    stage = MHCAStage(32, 32, 2, num_heads=8, mlp_ratio=2., num_path=3, drop_path_list=[0., 0.]).eval()
    inputs = [torch.randn(2, 32, 5, 5) for _ in range(3)]
    with torch.no_grad():
        plain = stage(inputs)

    class Scaled(nn.Module):  # a wrapper that keeps .weight / .bias, as adapters do
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.linear, self.weight, self.bias = linear, linear.weight, linear.bias

        def forward(self, x):
            return 2 * self.linear(x)

    layer = stage.mhca_blks[1].MHCA_layers[0]
    fc2 = layer.mlp.fc2
    layer.mlp.fc2 = Scaled(fc2)
    with pytest.warns(UserWarning, match=r'mhca_blks\.1\.MHCA_layers\.0 has a module that is wrapped'):
        mpvit.set_batch_paths(stage, 'always')
    assert type(stage) is MHCAStage
    with torch.no_grad():
        wrapped = stage(inputs)
        layer.mlp.fc2 = fc2
        handle = layer.norm1.register_forward_hook(lambda module, args, out: out * 0)
        with pytest.warns(UserWarning, match='has a forward hook'):
            mpvit.set_batch_paths(stage, 'always')
        assert type(stage) is MHCAStage
        hooked = stage(inputs)
        handle.remove()
        assert type(mpvit.set_batch_paths(stage, 'always')) is BatchedMHCAStage
        torch.testing.assert_close(stage(inputs), plain)
        layer.mlp.fc2 = Scaled(fc2)  # wrapped after installing: asking again puts the stage back per-path
        with pytest.warns(UserWarning, match='the stage runs its paths one by one'):
            mpvit.set_batch_paths(stage, 'always')
        assert type(stage) is MHCAStage
        torch.testing.assert_close(stage(inputs), wrapped)
    assert not torch.allclose(wrapped, plain) and not torch.allclose(hooked, plain)


def test_meta_device_forward_at_any_batch():
    """On 'meta' a conv returns a contiguous map, not a channels-last one: the batched layout must not assume it."""
    model = timm.create_model('mpvit_tiny', device='meta')
    out = model.forward_intermediates(torch.empty(2, 3, 64, 64, device='meta'), intermediates_only=True)
    assert [tuple(o.shape) for o in out] == [(2, 96, 16, 16), (2, 176, 8, 8), (2, 216, 4, 4), (2, 216, 2, 2)]


def test_paths_run_one_by_one_unless_batching_is_installed(monkeypatch):
    """Per-path on every device by default and with 'auto' (the batched form was never measured faster on a
    GPU); 'always' installs it on every stage, keeping the parameters, keys and outputs, and 'never' removes
    it; a mode that does not exist is a one-line error."""
    calls = []
    batched = BatchedMHCAStage.forward_paths
    monkeypatch.setattr(BatchedMHCAStage, 'forward_paths',
                        lambda self, inputs: calls.append(1) or batched(self, inputs))
    model = timm.create_model('mpvit_tiny').eval()
    stages = list(model.mhca_stages)
    state = model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        assert calls == [] and {type(s) for s in model.mhca_stages} == {MHCAStage}
        torch.testing.assert_close(mpvit.set_batch_paths(model, 'always')(x), plain)
        assert len(calls) == 4 and {type(s) for s in model.mhca_stages} == {BatchedMHCAStage}
        assert list(model.mhca_stages) == stages  # the same modules, swapped in place
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        mpvit.set_batch_paths(model, 'auto').to('meta')(torch.empty(1, 3, 64, 64, device='meta'))
    assert len(calls) == 4 and {type(s) for s in model.mhca_stages} == {MHCAStage}  # not on 'meta' either
    assert mpvit.set_batch_paths(model, 'never') is model and {type(s) for s in model.mhca_stages} == {MHCAStage}
    with pytest.raises(mpvit.UserError, match="batch_paths must be one of"):
        mpvit.set_batch_paths(model, 'sometimes')
