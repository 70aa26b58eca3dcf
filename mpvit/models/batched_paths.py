"""The batched execution of a stage's transformer paths: opt-in, installed on a built model.

Why it can be faster. The transformer paths of an MPViT stage have the same
width, depth and heads; only their weights and inputs differ. A
:class:`BatchedMHCAStage` runs them as one batch: per layer one depthwise conv
over the paths' concatenated channels for each position encoding, one group
norm (each path's LayerNorm), and batched products (``baddbmm`` over the paths'
stacked weights) for q, k, v, the output projection and the MLP. A layer then
launches the same kernels whatever the number of paths, which is what bounds a
GPU on these small maps (0.34x the reference's ops per training step, counted).
The residual stream is ``[B, H, W, P, C]`` (the paths' channels side by side,
what the convs and the aggregation want); the products read it as a strided
``[P, B * H * W, C]`` batch and write path-major results. The parameters stay
per path (checkpoint keys unchanged) and are stacked once per stage forward,
in one fused copy. In training, four autograd functions give backwards that
write less than autograd's own: gradients accumulated in place, and written in
each operand's own layout (no copies back).

Why it is not the default. A CPU is bound by arithmetic and its per-path
products (oneDNN ``linear``) are faster than its batched ones (0.76-0.89x of
per-path, measured); on a GPU the batched form has never been timed
(``dev/gpu_benchmark.sh`` is that check), and ``torch.compile`` / CUDA graphs
remove launch overhead too. So every stage runs path by path (the network file's
:class:`~mpvit.models.mpvit.MHCAStage`) until a GPU result in ``results/`` shows
this form faster; ``'auto'`` means per-path until then, and the default flips in
the commit that adds that JSON. Opting in is one call:
``mpvit.set_batch_paths(model, 'always')``.

Installing swaps each stage's class (as ``torch.nn.utils.parametrize`` does):
the stage keeps its identity, submodules, parameters, hooks and mode, so state
dicts, optimisers and references to it are untouched, and ``'never'`` swaps it
back. Whether a stage can be batched is decided then, once: the batched form
reads the paths' parameters and runs its own ops, so a stage whose path modules
are wrapped, replaced or hooked (a LoRA adapter, weight norm, feature taps)
stays per-path, with a warning. Wrap or hook path modules before installing:
changes made after it are not seen by the batched form until ``set_batch_paths``
is called again (which checks again, and puts such a stage back per-path).
"""
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, register_notrace_module
from timm.models import checkpoint

from mpvit.errors import InvalidInputError

from .mpvit import (
    ConvPosEnc,
    ConvRelPosEnc,
    FactorAttnConvRelPosEnc,
    LayerNorm,
    MHCALayer,
    MHCAStage,
    _autocast_dtype,
    _head_mask,
    _softmax,
)

__all__ = ['BATCH_PATHS', 'BatchedMHCAStage', 'paths_batchable', 'set_batch_paths']

BATCH_PATHS = ('auto', 'always', 'never')
# What 'auto' installs on every device: per-path until a GPU run in results/ shows the batched form faster.
AUTO = 'never'


def set_batch_paths(model: nn.Module, mode: str = 'auto') -> nn.Module:
    """Install (``'always'``) or remove (``'never'``) the batched execution of every MPViT stage inside
    ``model`` (a classifier, a detector, a segmentor, or a stage); ``'auto'`` is per-path on every device
    until a GPU measurement says otherwise (see the module docstring). Returns ``model``.

    Parameters, buffers and state-dict keys stay the same either way. A stage whose path modules are
    wrapped, replaced or hooked stays per-path, with a warning (:func:`paths_batchable`). Call it before
    ``torch.jit.script`` / ``torch.compile``, which take the stages' classes as they find them.
    """
    if mode not in BATCH_PATHS:
        raise InvalidInputError(f'batch_paths must be one of {BATCH_PATHS} (got {mode!r})')
    batched = (AUTO if mode == 'auto' else mode) == 'always'
    for name, module in model.named_modules():
        if not isinstance(module, MHCAStage):
            continue
        if type(module) not in (MHCAStage, BatchedMHCAStage):  # a subclass of someone else's: left alone
            continue
        reason = paths_batchable(module) if batched else ''
        if reason:  # checked again on a batched stage too: its path modules may have been wrapped since
            where = f'stage {name}' if name else 'the stage'
            warnings.warn(f'set_batch_paths: {where} runs its paths one by one: {reason}', stacklevel=2)
        module.__class__ = BatchedMHCAStage if batched and not reason else MHCAStage
    return model


def paths_batchable(stage: MHCAStage) -> str:
    """Why the batched form cannot stand for ``stage``'s path modules, or ``''`` when it can: it reads their
    parameters and runs its own ops, so it does only for the plain modules, without hooks."""
    for name, module in stage.mhca_blks.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f'mhca_blks.{name} has a forward hook' if name else 'mhca_blks has a forward hook'
    for i, encoder in enumerate(stage.mhca_blks):
        if not (type(encoder.cpe) is ConvPosEnc and type(encoder.cpe.proj) is nn.Conv2d
                and type(encoder.crpe) is ConvRelPosEnc
                and all(type(conv) is nn.Conv2d for conv in encoder.crpe.conv_list)):
            return f'mhca_blks.{i} has a position encoding that is not the plain module'
        for j, layer in enumerate(encoder.MHCA_layers):
            mlp, attn = layer.mlp, layer.factoratt_crpe
            if not (type(layer) is MHCALayer and type(layer.norm1) is LayerNorm and type(layer.norm2) is LayerNorm
                    and type(attn) is FactorAttnConvRelPosEnc and type(attn.qkv) is nn.Linear
                    and type(attn.proj) is nn.Linear and type(mlp) is Mlp and type(mlp.fc1) is nn.Linear
                    and type(mlp.fc2) is nn.Linear and type(mlp.act) is nn.GELU and mlp.act.approximate == 'none'
                    and type(mlp.norm) is nn.Identity
                    and all(type(d) is nn.Identity or (type(d) is nn.Dropout and d.p == 0)
                            for d in (mlp.drop1, mlp.drop2))
                    and (type(layer.drop_path) is nn.Identity
                         or (type(layer.drop_path) is DropPath and layer.has_drop_path))):
                return f'mhca_blks.{i}.MHCA_layers.{j} has a module that is wrapped or replaced'
    return ''


def _path_norm(x: torch.Tensor, num_paths: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Each path's LayerNorm on ``[B, H, W, P, C]`` as one group norm with P groups over the ``P * C`` channels
    of a token (per-channel affine ``[P * C]``: each path's own); ``[B * H * W, P * C]`` out. In the autocast
    dtype under autocast, as :class:`LayerNorm`. ``num_paths`` is a Python int, not read off the shape: a
    traced group count is not a constant to ONNX."""
    tokens = x.flatten(0, 2).flatten(1)
    # torch.group_norm: F.group_norm's Python batch-size check turns traced sizes into constants.
    if torch.jit.is_scripting() or dtype is None:
        return torch.group_norm(tokens, num_paths, weight, bias, eps, False)
    with torch.autocast(x.device.type, enabled=False):
        return torch.group_norm(tokens.to(dtype), num_paths, weight, bias, eps, False)


def _qkv_products(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  training: bool = False) -> List[torch.Tensor]:
    """q, k and v of every path, ``[P, M, C]`` each: three batched products of ``y`` ``[P, M, C]`` with the
    paths' stacked ``[P, 3 * C, C]`` qkv weights. Three products rather than one and three strided views:
    q, k and v come out contiguous, which the softmax and the CRPE conv would otherwise copy to get.
    ``training``: by :class:`_QKVProducts`."""
    if training:
        return _qkv_products_accumulating(y, weight, bias)
    weights = weight.chunk(3, dim=1)
    biases = bias.unsqueeze(1).chunk(3, dim=2)
    return [torch.baddbmm(biases[i], y, weights[i].transpose(1, 2)) for i in range(3)]


class _QKVProducts(torch.autograd.Function):
    """:func:`_qkv_products` whose backward accumulates ``y``'s gradient in place (one ``bmm``, two ``baddbmm_``)
    instead of three products and two adds of activation-sized tensors. (Forward and ``setup_context`` apart,
    so that torch.func's transforms accept it.)"""
    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        return tuple(_qkv_products(y, weight, bias))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, weight, _ = inputs
        ctx.save_for_backward(y, weight)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        y, weight = ctx.saved_tensors
        grads, weights = (grad_q, grad_k, grad_v), weight.chunk(3, dim=1)
        grad_y = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.bmm(grad_q, weights[0])
            if torch.is_grad_enabled():  # a backward that builds a graph: out of place (vmap has no in-place rule)
                grad_y = torch.baddbmm(torch.baddbmm(grad_y, grad_k, weights[1]), grad_v, weights[2])
            else:
                grad_y = grad_y.baddbmm_(grad_k, weights[1]).baddbmm_(grad_v, weights[2])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.cat([torch.bmm(g.transpose(1, 2), y) for g in grads], dim=1)
        if ctx.needs_input_grad[2]:
            grad_bias = torch.cat([g.sum(1) for g in grads], dim=1)
        return grad_y, grad_weight, grad_bias


def _path_linear(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, training: bool = False) -> torch.Tensor:
    """Each path's Linear on ``y`` ``[P, M, in]``: one batched product with the stacked ``[P, out, in]`` weights.
    ``training``: by :class:`_PathLinear`."""
    if training:
        return _path_linear_own_layout(y, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), y, weight.transpose(1, 2))


class _PathLinear(torch.autograd.Function):
    """:func:`_path_linear` whose weight gradient is written ``[P, out, in]``, the weight's own layout (autograd's
    ``baddbmm`` backward writes the transposed operand's ``[P, in, out]``, which then takes a copy to get back)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return _path_linear(y, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, weight, _ = inputs
        ctx.save_for_backward(y, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, weight = ctx.saved_tensors
        grad_y = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), y) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.needs_input_grad[2] else None
        return grad_y, grad_weight, grad_bias


@torch.jit.unused
def _path_linear_own_layout(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`_path_linear` for training (an autograd function: not for TorchScript or tracing)."""
    return _PathLinear.apply(y, weight, bias)


class _MulInOwnLayouts(torch.autograd.Function):
    """``a * b`` (same shape) whose backward writes each operand's gradient in that operand's own memory layout.
    Autograd's ``mul`` backward writes both in the output's, and a permuted view's gradient then takes a copy
    back (the CRPE conv's output, read path-major, is one)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = _mul_into_layout(grad, b, a) if ctx.needs_input_grad[0] else None
        grad_b = _mul_into_layout(grad, a, b) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _mul_into_layout(x: torch.Tensor, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x * y`` written in ``like``'s memory layout. A backward that builds a graph (double backward, torch.func)
    gets the plain product (``out=`` is not differentiable), and so does torch.compile (which chooses layouts
    itself, and whose Dynamo refuses a strided ``out=``)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return x * y
    return torch.mul(x, y, out=torch.empty_like(like))


@torch.jit.unused
def _mul_in_own_layouts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:class:`_MulInOwnLayouts` (an autograd function: not for TorchScript or tracing)."""
    return _MulInOwnLayouts.apply(a, b)


class _StackParams(torch.autograd.Function):
    """``torch.cat(pieces).to(dtype).split(sizes)`` writing each element once each way: one fused copy-and-cast
    over all the pieces (``torch._foreach_copy_``, a few kernels on CUDA) into one buffer, and in the backward
    the gradients likewise into one buffer of the pieces' dtype, handed back as views of it. (The composite
    writes the float32 concatenation, then its cast; the backward concatenates, then casts.)"""

    @staticmethod
    def forward(dtype: torch.dtype, sizes: List[int], *pieces: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        numels = [piece.numel() for piece in pieces]
        flat = pieces[0].new_empty(sum(numels), dtype=dtype)
        torch._foreach_copy_(flat.split(numels), pieces)
        return flat.split(sizes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, sizes, *pieces = inputs
        ctx.sizes, ctx.numels, ctx.dtype = sizes, [piece.numel() for piece in pieces], pieces[0].dtype

    @staticmethod
    def vmap(info, in_dims, dtype: torch.dtype, sizes: List[int], *pieces: torch.Tensor):
        """Under ``torch.func.vmap`` (per-sample gradients, say): the composite, per sample."""
        pieces = tuple(piece.movedim(dim, 0) if dim is not None else piece.expand(info.batch_size, -1)
                       for piece, dim in zip(pieces, in_dims[2:]))
        outputs = torch.cat(pieces, dim=1).to(dtype).split(sizes, dim=1)
        return outputs, (0,) * len(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        if torch.is_grad_enabled():  # a backward that builds a graph (double backward, torch.func): plain ops
            flat = torch.cat(grads).to(ctx.dtype)
        else:
            flat = grads[0].new_empty(sum(ctx.numels), dtype=ctx.dtype)
            torch._foreach_copy_(flat.split(ctx.sizes), grads)
        return (None, None) + flat.split(ctx.numels)


def _stack_params(pieces: List[torch.Tensor], sizes: List[int], dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    """The 1-D ``pieces`` concatenated, cast to ``dtype`` (if given) and split into ``sizes``."""
    flat = torch.cat(pieces)
    return list((flat if dtype is None else flat.to(dtype)).split(sizes))


@torch.jit.unused
def _stack_params_once(pieces: List[torch.Tensor], sizes: List[int],
                       dtype: Optional[torch.dtype]) -> List[torch.Tensor]:
    """:func:`_stack_params` by :class:`_StackParams` (an autograd function: not for TorchScript or tracing).
    Pieces of mixed dtypes take the composite, which promotes them as ``torch.cat`` does."""
    if any(piece.dtype != pieces[0].dtype for piece in pieces):
        return _stack_params(pieces, sizes, dtype)
    return list(_StackParams.apply(pieces[0].dtype if dtype is None else dtype, sizes, *pieces))


@torch.jit.unused
def _qkv_products_accumulating(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> List[torch.Tensor]:
    """:func:`_qkv_products` for training (an autograd function: not for TorchScript or tracing)."""
    return list(_QKVProducts.apply(y, weight, bias))


def _paths_to_channels(x: torch.Tensor) -> torch.Tensor:
    """``[P, B, H, W, C]`` -> ``[B, P * C, H, W]`` channels-last (one copy)."""
    p, b, height, width, c = x.shape
    return x.permute(1, 2, 3, 0, 4).reshape(b, height, width, p * c).permute(0, 3, 1, 2)


def _layer_paths(x: torch.Tensor, num_paths: int, params: List[torch.Tensor], cpe_w: torch.Tensor,
                 cpe_b: torch.Tensor, crpe_w: torch.Tensor, crpe_b: torch.Tensor, head_mask: torch.Tensor,
                 num_heads: int, scale: float, eps1: float, eps2: float, drop_attn: Optional[torch.Tensor],
                 drop_mlp: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One :class:`~mpvit.models.mpvit.MHCALayer` of every path of the stage at once, on ``[B, H, W, P, C]``:
    ``params`` are the paths' layer parameters stacked (:meth:`BatchedMHCAStage._stage_weights`);
    ``drop_attn`` / ``drop_mlp`` the layer's stochastic-depth masks ``[P, B, 1, 1, 1]``, or None."""
    norm1_w, norm1_b, norm2_w, norm2_b, qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b = params
    b, height, width, p, c = x.shape
    n, h = height * width, num_heads
    # CPE: x + depthwise conv(x), residual in the kernel, every path's channels in one conv. The conv
    # returns channels-last here (then .contiguous() is free), but not on every backend ('meta', say).
    x = F.conv2d(x.view(b, height, width, p * c).permute(0, 3, 1, 2), cpe_w, cpe_b,
                 padding=cpe_w.shape[-1] // 2, groups=p * c)
    x = x.permute(0, 2, 3, 1).contiguous().view(b, height, width, p, c)

    # Factorized attention, path-major: q, k, v [P, B * N, C] from three batched products.
    y = _path_norm(x, num_paths, norm1_w, norm1_b, eps1, dtype).view(b * n, p, c).transpose(0, 1)
    # Training uses autograd functions whose backwards write less (TorchScript and tracing: plain ops).
    training = torch.is_grad_enabled() and not (torch.jit.is_scripting() or torch.jit.is_tracing())
    q, k, v = _qkv_products(y, qkv_w, qkv_b, training)
    context = torch.bmm(_softmax(k.view(p * b, n, c), dim=1).transpose(1, 2), v.view(p * b, n, c))
    context = (context.view(p * b, h, c // h, h, c // h) * head_mask).view(p * b, c, c)  # each head's block
    # CRPE: q * depthwise conv(v), every path's channels in one conv.
    conv_v = F.conv2d(_paths_to_channels(v.view(p, b, height, width, c)), crpe_w, crpe_b,
                      padding=crpe_w.shape[-1] // 2, groups=p * c)
    conv_v = conv_v.permute(0, 2, 3, 1).reshape(b, height, width, p, c).permute(3, 0, 1, 2, 4)
    q5 = q.view(p, b, height, width, c)
    crpe = (_mul_in_own_layouts(q5, conv_v) if training else q5 * conv_v).reshape(p * b, n, c)
    out = torch.baddbmm(crpe, q.view(p * b, n, c), context, alpha=scale)
    out = _path_linear(out.view(p, b * n, c), proj_w, proj_b, training).view(p, b, height, width, c)
    # Stochastic depth on [P, B, ...] as is: merging P and B into one batch would make the backward copy the
    # residual's gradient into that layout.
    x = x + (out if drop_attn is None else out * drop_attn).permute(1, 2, 3, 0, 4)

    # MLP.
    y = _path_norm(x, num_paths, norm2_w, norm2_b, eps2, dtype).view(b * n, p, c).transpose(0, 1)
    hidden = F.gelu(_path_linear(y, fc1_w, fc1_b, training))
    out = _path_linear(hidden, fc2_w, fc2_b, training).view(p, b, height, width, c)
    return x + (out if drop_mlp is None else out * drop_mlp).permute(1, 2, 3, 0, 4)


@register_notrace_module  # fx leaf, as MHCAStage
class BatchedMHCAStage(MHCAStage):
    """An :class:`~mpvit.models.mpvit.MHCAStage` whose transformer paths run as one batch (see the module
    docstring). Not built: :func:`set_batch_paths` swaps a built stage to it, and back.

    Same submodules, parameters and state-dict keys as the stage; with ``fast_ops`` off (textbook ops, for
    FLOP counts) it runs its paths one by one, as the plain stage.

    Args:
        none of its own: it is never constructed, a built stage's class is swapped to it (arguments: see
        :class:`~mpvit.models.mpvit.MHCAStage`).
    """

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        outputs = [self.InvRes(inputs[0])]
        if self.fast_ops:
            outputs.append(self.forward_paths(inputs))
        else:
            for i, encoder in enumerate(self.mhca_blks):
                outputs.append(encoder(inputs[i]))
        return self.aggregate(torch.cat(outputs, dim=1))

    def forward_paths(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """All transformer paths as one batch: ``inputs[p]`` ``[B, C, H, W]`` in, ``[B, P * C, H, W]`` out (the
        paths' outputs side by side, channels-last)."""
        num_paths = len(self.mhca_blks)
        x = torch.stack([inputs[i].permute(0, 2, 3, 1) for i in range(num_paths)], dim=3)  # [B, H, W, P, C]
        dtype = _autocast_dtype(x)
        layer_params, cpe_w, cpe_b, crpe_w, crpe_b = self._stage_weights(dtype)
        head_mask = _head_mask(self.num_heads, x.dtype if dtype is None else dtype, x.device)
        checkpointing = self.mhca_blks[0].grad_checkpointing  # set_grad_checkpointing sets every encoder's
        # The first path's layers give what all paths share: heads, scale, the norms' epsilon, stochastic depth.
        for i, layer in enumerate(self.mhca_blks[0].MHCA_layers):
            drop_attn: Optional[torch.Tensor] = None
            drop_mlp: Optional[torch.Tensor] = None
            if layer.has_drop_path and layer.drop_path.training:  # the module's own mode, as its forward reads
                # A [P * B] mask per residual branch, drawn by the layer's DropPath as on the merged batch.
                ones = x.new_ones(num_paths * x.shape[0], 1, 1, 1)
                drop_attn = layer.drop_path(ones).view(num_paths, x.shape[0], 1, 1, 1)
                drop_mlp = layer.drop_path(ones).view(num_paths, x.shape[0], 1, 1, 1)
            args = (num_paths, layer_params[i], cpe_w, cpe_b, crpe_w, crpe_b, head_mask,
                    layer.factoratt_crpe.num_heads, layer.factoratt_crpe.scale, layer.norm1.eps, layer.norm2.eps,
                    drop_attn, drop_mlp, dtype)
            if checkpointing and not torch.jit.is_scripting():
                x = checkpoint(_layer_paths, x, *args)
            else:
                x = _layer_paths(x, *args)
        return x.flatten(3).permute(0, 3, 1, 2)

    def _stage_weights(self, dtype: Optional[torch.dtype]) -> Tuple[
            List[List[torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every path's parameters, stacked per layer: ``[P, ...]`` per tensor of a layer (``[P * C]`` for
        the norms), and the CPE / CRPE kernels of all paths as single depthwise convs.

        One fused copy (and cast) for the whole stage into one buffer, split into views; its backward writes
        the gradients into one buffer in the parameters' dtype, whatever the number of layers and paths
        (:class:`_StackParams`)."""
        num_paths = len(self.mhca_blks)
        per_path: List[List[List[torch.Tensor]]] = []  # [path][layer][tensor]
        k_max = 0
        for encoder in self.mhca_blks:
            layers: List[List[torch.Tensor]] = []
            for layer in encoder.MHCA_layers:  # the norms' weights and biases first: stacked flat
                attn, mlp = layer.factoratt_crpe, layer.mlp
                layers.append([layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
                               attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                               mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias])
            per_path.append(layers)
            k_max = max(k_max, encoder.crpe.max_kernel_size())
        num_layers, num_tensors = len(per_path[0]), len(per_path[0][0])
        pieces: List[torch.Tensor] = []
        shapes: List[List[int]] = []  # of each layer's tensors, stacked over the paths
        for j, tensor in enumerate(per_path[0][0]):
            shape = list(tensor.shape)
            shapes.append([num_paths * shape[0]] if j < 4 else [num_paths] + shape)
        for i in range(num_layers):
            for j in range(num_tensors):
                for path in per_path:
                    tensor = path[i][j]
                    pieces.append(tensor if tensor.dim() == 1 else tensor.reshape(-1))  # (views cost dispatches)
        cpe = self.mhca_blks[0].cpe.proj
        k = cpe.kernel_size[0]
        identity = F.pad(cpe.weight.new_ones(cpe.out_channels, 1, 1, 1), [k // 2] * 4)  # +1 at the centre tap
        for encoder in self.mhca_blks:  # x + conv(x) as one conv, in float32 (before any cast)
            weight = encoder.cpe.proj.weight
            pieces.append((weight if encoder.cpe.residual_in_kernel else weight + identity).reshape(-1))
        for encoder in self.mhca_blks:
            bias = encoder.cpe.proj.bias
            assert bias is not None  # always (the conv has a bias); says so to TorchScript
            pieces.append(bias)
        crpe_biases: List[torch.Tensor] = []
        for encoder in self.mhca_blks:
            weights, biases = encoder.crpe.padded_kernels(k_max)
            pieces += [w.reshape(-1) for w in weights]
            crpe_biases += biases
        pieces += crpe_biases
        channels = num_paths * cpe.out_channels
        sizes = [num_paths * t.numel() for t in per_path[0][0]] * num_layers + [
            channels * k * k, channels, channels * k_max * k_max, channels]
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            split = _stack_params(pieces, sizes, dtype)
        else:
            split = _stack_params_once(pieces, sizes, dtype)
        layer_params: List[List[torch.Tensor]] = []
        for i in range(num_layers):
            piece = split[i * num_tensors:(i + 1) * num_tensors]
            layer_params.append([piece[j] if len(shapes[j]) == 1 else piece[j].view(shapes[j])
                                 for j in range(num_tensors)])
        return (layer_params, split[-4].view(channels, 1, k, k), split[-3],
                split[-2].view(channels, 1, k_max, k_max), split[-1])
